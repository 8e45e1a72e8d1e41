//! Memory usage reports: the attribute lists Triton copies from
//! `TRITONBACKEND_ModelReportMemoryUsage` and `..._ModelInstanceReportMemoryUsage`.

use std::ptr::{self, NonNull};

use triton_sys as sys;

use super::error::{Error, Result, check};
use crate::types::{MemoryPlace, MemoryUsage};

/// An owned `TRITONSERVER_BufferAttributes`, deleted on drop.
struct BufferAttributes(NonNull<sys::TRITONSERVER_BufferAttributes>);

impl BufferAttributes {
    fn new(usage: &MemoryUsage) -> Result<Self> {
        let mut raw = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the new object becomes ours.
        check(unsafe { sys::TRITONSERVER_BufferAttributesNew(&mut raw) })?;
        let attributes = NonNull::new(raw)
            .map(BufferAttributes)
            .ok_or_else(|| Error::internal("Triton returned null buffer attributes"))?;
        let (memory_type, memory_type_id) = match usage.place {
            MemoryPlace::Cpu => (sys::TRITONSERVER_MEMORY_CPU, 0),
            MemoryPlace::CpuPinned => (sys::TRITONSERVER_MEMORY_CPU_PINNED, 0),
            MemoryPlace::Gpu { device_id } => (sys::TRITONSERVER_MEMORY_GPU, device_id),
        };
        let byte_size = usize::try_from(usage.bytes)
            .map_err(|_| Error::internal("a memory usage does not fit in size_t"))?;
        // On an error below, `attributes` is dropped, which deletes it.
        // SAFETY: the attributes are live and ours; the setter stores a plain value.
        check(unsafe {
            sys::TRITONSERVER_BufferAttributesSetMemoryType(attributes.0.as_ptr(), memory_type)
        })?;
        // SAFETY: as above.
        check(unsafe {
            sys::TRITONSERVER_BufferAttributesSetMemoryTypeId(attributes.0.as_ptr(), memory_type_id)
        })?;
        // SAFETY: as above.
        check(unsafe {
            sys::TRITONSERVER_BufferAttributesSetByteSize(attributes.0.as_ptr(), byte_size)
        })?;
        Ok(attributes)
    }
}

impl Drop for BufferAttributes {
    fn drop(&mut self) {
        // SAFETY: the attributes are ours and deleted exactly once, here.
        let result = check(unsafe { sys::TRITONSERVER_BufferAttributesDelete(self.0.as_ptr()) });
        if let Err(error) = result {
            crate::log_error!("failed to delete buffer attributes: {error}");
        }
    }
}

/// Builds the attribute list for `usage` and hands it to `report`, which Triton copies
/// (the list stays ours and is deleted when this returns).
pub(super) fn report(
    usage: &[MemoryUsage],
    report: impl FnOnce(
        *mut *mut sys::TRITONSERVER_BufferAttributes,
        u32,
    ) -> *mut sys::TRITONSERVER_Error,
) -> Result<()> {
    let attributes = MemoryUsage::by_place(usage)
        .iter()
        .map(BufferAttributes::new)
        .collect::<Result<Vec<_>>>()?;
    let mut raw: Vec<*mut sys::TRITONSERVER_BufferAttributes> =
        attributes.iter().map(|a| a.0.as_ptr()).collect();
    let count =
        u32::try_from(raw.len()).map_err(|_| Error::internal("too many memory usage entries"))?;
    check(report(raw.as_mut_ptr(), count))
}
