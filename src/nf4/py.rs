//! Python bindings for exact NF4.
//!
//! Functions registered on `gptoss_3090._native`:
//! - `nf4_code_table() -> ndarray[float32, (16,)]`
//! - `dynamic_map_signed() -> ndarray[float32, (256,)]`
//! - `nf4_quantize(values, nested) -> dict`
//! - `nf4_dequantize(packed, absmax, n, dtype, quant_map, nested_absmax=None,
//!   nested_quant_map=None, nested_offset=None) -> ndarray`
//!
//! Array inputs must be C-contiguous numpy arrays of the stated dtype; they are copied before the
//! GIL is released, so Python threads cannot race with the computation. Every bad input raises
//! `ValueError` naming the argument.

use numpy::{Element, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::{Absmax, DequantOut, FloatDtype, OwnedAbsmax};
use crate::error::Error;

/// Describes a Python object for an error message: its type, and dtype/shape for arrays.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let dtype = arr
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into());
        return format!("ndarray of {dtype} with shape {:?}", arr.shape());
    }
    obj.get_type()
        .name()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "an unknown object".into())
}

/// Copies a C-contiguous numpy array of element type `T` (any number of dimensions) into a Vec.
fn array_to_vec<T: Element + Copy>(
    obj: &Bound<'_, PyAny>,
    name: &str,
    dtype: &str,
    one_d: bool,
) -> Result<Vec<T>, Error> {
    let arr = obj.cast::<PyArrayDyn<T>>().map_err(|_| {
        Error::arg(format!(
            "{name}: expected a numpy {dtype} array, found {}",
            describe(obj)
        ))
    })?;
    if one_d && arr.ndim() != 1 {
        return Err(Error::arg(format!(
            "{name}: expected a 1-D array, found shape {:?}",
            arr.shape()
        )));
    }
    let ro = arr
        .try_readonly()
        .map_err(|e| Error::arg(format!("{name}: cannot borrow the array: {e}")))?;
    let slice = ro.as_slice().map_err(|_| {
        Error::arg(format!(
            "{name}: expected a C-contiguous array, found strides {:?}",
            arr.strides()
        ))
    })?;
    Ok(slice.to_vec())
}

/// `nf4_code_table() -> ndarray[float32, (16,)]`: the NF4 code table (index = 4-bit code).
#[pyfunction]
fn nf4_code_table(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
    PyArray1::from_slice(py, &super::NF4_CODE)
}

/// `dynamic_map_signed() -> ndarray[float32, (256,)]`: bitsandbytes
/// `create_dynamic_map(signed=True)` (the nested 8-bit map).
#[pyfunction]
fn dynamic_map_signed(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
    PyArray1::from_slice(py, &super::dynamic_map_signed())
}

/// `nf4_quantize(values: ndarray[float32] (1-D, contiguous), nested: bool) -> dict`.
///
/// Keys: `packed` (uint8 [ceil(n/2)]), `absmax` (uint8 [nb] nested, float32 [nb] plain), and when
/// nested `nested_absmax` (float32 [ceil(nb/256)]) and `nested_offset` (float).
#[pyfunction]
fn nf4_quantize<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    nested: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let values: Vec<f32> = array_to_vec(values, "values", "float32", true)?;
    let q = py.detach(move || super::quantize(&values, nested))?;
    let out = PyDict::new(py);
    out.set_item("packed", PyArray1::from_vec(py, q.packed))?;
    match q.absmax {
        OwnedAbsmax::Plain(a) => out.set_item("absmax", PyArray1::from_vec(py, a))?,
        OwnedAbsmax::Nested {
            codes,
            nested_absmax,
            offset,
        } => {
            out.set_item("absmax", PyArray1::from_vec(py, codes))?;
            out.set_item("nested_absmax", PyArray1::from_vec(py, nested_absmax))?;
            out.set_item("nested_offset", f64::from(offset))?;
        }
    }
    Ok(out)
}

/// `nf4_dequantize(packed, absmax, n, dtype, quant_map, nested_absmax=None,
/// nested_quant_map=None, nested_offset=None) -> ndarray`.
///
/// `packed`: uint8 (any shape, contiguous). `absmax`: uint8 codes when `nested_absmax` is given,
/// else float32. `dtype`: "bfloat16" | "float16" | "float32". Returns a 1-D array of `n` values:
/// uint16 bit patterns for bfloat16/float16, float32 for float32.
#[pyfunction]
#[pyo3(signature = (packed, absmax, n, dtype, quant_map, nested_absmax=None, nested_quant_map=None, nested_offset=None))]
#[allow(clippy::too_many_arguments)]
fn nf4_dequantize<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    absmax: &Bound<'py, PyAny>,
    n: i64,
    dtype: &str,
    quant_map: &Bound<'py, PyAny>,
    nested_absmax: Option<&Bound<'py, PyAny>>,
    nested_quant_map: Option<&Bound<'py, PyAny>>,
    nested_offset: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let dtype = FloatDtype::from_name(dtype)?;
    let n = usize::try_from(n).map_err(|_| {
        Error::arg(format!(
            "n: expected a non-negative element count, found {n}"
        ))
    })?;
    let packed: Vec<u8> = array_to_vec(packed, "packed", "uint8", false)?;
    // Check before allocating an n-element output.
    if packed.len() < n.div_ceil(2) {
        return Err(Error::arg(format!(
            "packed length: expected at least {} bytes (ceil(n / 2) for n = {n}), found {}",
            n.div_ceil(2),
            packed.len()
        ))
        .into());
    }
    let quant_map: Vec<f32> = array_to_vec(quant_map, "quant_map", "float32", false)?;
    enum Stats {
        Plain(Vec<f32>),
        Nested(Vec<u8>, Vec<f32>, Vec<f32>, f32),
    }
    let stats = match (nested_absmax, nested_quant_map, nested_offset) {
        (Some(na), Some(nm), Some(off)) => Stats::Nested(
            array_to_vec(absmax, "absmax", "uint8 (nested codes)", false)?,
            array_to_vec(na, "nested_absmax", "float32", false)?,
            array_to_vec(nm, "nested_quant_map", "float32", false)?,
            off as f32,
        ),
        (None, None, None) => Stats::Plain(array_to_vec(absmax, "absmax", "float32", false)?),
        (na, nm, off) => {
            return Err(Error::arg(format!(
                "nested statistics: pass all of nested_absmax, nested_quant_map and nested_offset, or none; \
                 found nested_absmax={}, nested_quant_map={}, nested_offset={}",
                if na.is_some() { "given" } else { "None" },
                if nm.is_some() { "given" } else { "None" },
                if off.is_some() { "given" } else { "None" },
            ))
            .into())
        }
    };
    let run = |out: DequantOut| -> Result<(), Error> {
        let borrowed = match &stats {
            Stats::Plain(a) => Absmax::Plain(a),
            Stats::Nested(codes, na, nm, off) => Absmax::Nested {
                codes,
                nested_absmax: na,
                nested_map: nm,
                offset: *off,
            },
        };
        super::dequantize_into(&packed, &borrowed, &quant_map, n, out)
    };
    match dtype {
        FloatDtype::F32 => {
            let out = py.detach(|| -> Result<Vec<f32>, Error> {
                let mut out = vec![0.0f32; n];
                run(DequantOut::F32(&mut out))?;
                Ok(out)
            })?;
            Ok(PyArray1::from_vec(py, out).into_any())
        }
        FloatDtype::BF16 | FloatDtype::F16 => {
            let out = py.detach(|| -> Result<Vec<u16>, Error> {
                let mut out = vec![0u16; n];
                run(DequantOut::Bits16(&mut out, dtype))?;
                Ok(out)
            })?;
            Ok(PyArray1::from_vec(py, out).into_any())
        }
    }
}

/// Registers the NF4 functions on the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(nf4_code_table, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map_signed, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(nf4_dequantize, m)?)?;
    Ok(())
}
