//! Metrics a backend adds to Triton's own Prometheus endpoint (`:8002/metrics`), beside
//! Triton's `nv_*` metrics, through `TRITONSERVER_MetricFamily*`.
//!
//! Ownership: a [`Metric`] keeps its [`MetricFamily`] alive (Triton requires a metric to
//! be deleted before its family), so the family is deleted after its last metric. Two
//! metrics with the same family and labels are one series in Triton (reference
//! counted): a model reloaded with the same labels continues its predecessor's counters
//! as long as one of them is loaded.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

use triton_sys as sys;

use super::error::{Error, Result, c_string, check};

/// What a family's metrics are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn to_raw(self) -> sys::TRITONSERVER_MetricKind {
        match self {
            MetricKind::Counter => sys::TRITONSERVER_METRIC_KIND_COUNTER,
            MetricKind::Gauge => sys::TRITONSERVER_METRIC_KIND_GAUGE,
            MetricKind::Histogram => sys::TRITONSERVER_METRIC_KIND_HISTOGRAM,
        }
    }
}

/// A named metric (`# HELP`/`# TYPE` in the exposition); its series are [`Metric`]s,
/// one per set of labels.
#[derive(Debug)]
pub struct MetricFamily {
    raw: NonNull<sys::TRITONSERVER_MetricFamily>,
    kind: MetricKind,
    name: String,
    /// Series handed out by [`MetricFamily::lasting`], by labels.
    lasting: Mutex<HashMap<Labels, Arc<Metric>>>,
}

/// A series' labels, as (key, value) pairs in the order given.
type Labels = Vec<(String, String)>;

// SAFETY: Triton's metric API is thread-safe (the families and series are
// prometheus-cpp objects, which lock); the handle is only a pointer to one.
unsafe impl Send for MetricFamily {}
// SAFETY: as above.
unsafe impl Sync for MetricFamily {}

impl MetricFamily {
    /// Registers family `name` with Triton. A family of the same name, kind and
    /// description that exists already (another model's) is shared.
    pub fn new(kind: MetricKind, name: &str, description: &str) -> Result<Arc<Self>> {
        let c_name = c_string("metric name", name)?;
        let c_description = c_string("metric description", description)?;
        let mut raw = ptr::null_mut();
        // SAFETY: both strings are NUL-terminated and outlive the call (Triton copies
        // them); `raw` is a valid out-pointer and the family it receives becomes ours.
        check(unsafe {
            sys::TRITONSERVER_MetricFamilyNew(
                &mut raw,
                kind.to_raw(),
                c_name.as_ptr(),
                c_description.as_ptr(),
            )
        })?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::internal(format!("Triton returned no metric family '{name}'")))?;
        Ok(Arc::new(MetricFamily {
            raw,
            kind,
            name: name.to_owned(),
            lasting: Mutex::new(HashMap::new()),
        }))
    }

    /// The series of this family with `labels`, created once and kept for the life of
    /// the process (`buckets` for a histogram, `None` otherwise): a model version that
    /// is unloaded and loaded again gets the same series back. Deleting a series while
    /// a load creates one with the same labels races inside Triton's metric registry
    /// (heap corruption seen in load/unload cycles), so these are never deleted; there
    /// is one per model version ever loaded.
    pub fn lasting(
        self: &Arc<Self>,
        labels: &[(&str, &str)],
        buckets: Option<&[f64]>,
    ) -> Result<Arc<Metric>> {
        let key: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut lasting = self.lasting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(metric) = lasting.get(&key) {
            return Ok(Arc::clone(metric));
        }
        let metric = Arc::new(match buckets {
            Some(buckets) => self.histogram(labels, buckets)?,
            None => self.metric(labels)?,
        });
        lasting.insert(key, Arc::clone(&metric));
        Ok(metric)
    }

    /// The counter or gauge of this family with `labels`.
    pub fn metric(self: &Arc<Self>, labels: &[(&str, &str)]) -> Result<Metric> {
        if self.kind == MetricKind::Histogram {
            return Err(Error::invalid_arg(format!(
                "'{}' is a histogram: give its buckets",
                self.name
            )));
        }
        self.new_metric(labels, None)
    }

    /// The histogram of this family with `labels` and bucket upper bounds `buckets`
    /// (increasing; `+Inf` is implied).
    pub fn histogram(self: &Arc<Self>, labels: &[(&str, &str)], buckets: &[f64]) -> Result<Metric> {
        if self.kind != MetricKind::Histogram {
            return Err(Error::invalid_arg(format!(
                "'{}' is not a histogram",
                self.name
            )));
        }
        let args = HistogramArgs::new(buckets)?;
        self.new_metric(labels, Some(&args))
    }

    fn new_metric(
        self: &Arc<Self>,
        labels: &[(&str, &str)],
        args: Option<&HistogramArgs>,
    ) -> Result<Metric> {
        let labels = labels
            .iter()
            .map(|(key, value)| Label::new(key, value))
            .collect::<Result<Vec<_>>>()?;
        let mut raw_labels: Vec<*const sys::TRITONSERVER_Parameter> = labels
            .iter()
            .map(|label| label.0.as_ptr().cast_const())
            .collect();
        let mut raw = ptr::null_mut();
        // SAFETY: the family is live; the labels are live parameters (Triton copies
        // them) and the array holds exactly `len` of them; `args`, if any, is live; `raw`
        // is a valid out-pointer and the metric it receives becomes ours.
        check(unsafe {
            match args {
                Some(args) => sys::TRITONSERVER_MetricNewWithArgs(
                    &mut raw,
                    self.raw.as_ptr(),
                    raw_labels.as_mut_ptr(),
                    raw_labels.len() as u64,
                    args.0.as_ptr(),
                ),
                None => sys::TRITONSERVER_MetricNew(
                    &mut raw,
                    self.raw.as_ptr(),
                    raw_labels.as_mut_ptr(),
                    raw_labels.len() as u64,
                ),
            }
        })?;
        let raw = NonNull::new(raw).ok_or_else(|| {
            Error::internal(format!("Triton returned no metric of '{}'", self.name))
        })?;
        Ok(Metric {
            raw,
            family: Arc::clone(self),
        })
    }
}

impl Drop for MetricFamily {
    fn drop(&mut self) {
        // SAFETY: the family is ours and deleted exactly once, after its last metric
        // (each holds an `Arc` of it).
        let deleted = unsafe { sys::TRITONSERVER_MetricFamilyDelete(self.raw.as_ptr()) };
        if let Err(error) = check(deleted) {
            crate::log_error!("failed to delete metric family '{}': {error}", self.name);
        }
    }
}

/// One series: a family's metric with one set of labels.
#[derive(Debug)]
pub struct Metric {
    raw: NonNull<sys::TRITONSERVER_Metric>,
    /// Dropped after the metric is deleted (fields drop after `Drop::drop`).
    family: Arc<MetricFamily>,
}

// SAFETY: as for `MetricFamily`: Triton's metrics are thread-safe.
unsafe impl Send for Metric {}
// SAFETY: as above.
unsafe impl Sync for Metric {}

impl Metric {
    /// Adds `value` (counter: not negative; gauge: either sign).
    pub fn increment(&self, value: f64) -> Result<()> {
        // SAFETY: the metric is live while `self` is.
        check(unsafe { sys::TRITONSERVER_MetricIncrement(self.raw.as_ptr(), value) })
    }

    /// Sets a gauge.
    pub fn set(&self, value: f64) -> Result<()> {
        // SAFETY: the metric is live while `self` is.
        check(unsafe { sys::TRITONSERVER_MetricSet(self.raw.as_ptr(), value) })
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, value: f64) -> Result<()> {
        // SAFETY: the metric is live while `self` is.
        check(unsafe { sys::TRITONSERVER_MetricObserve(self.raw.as_ptr(), value) })
    }
}

impl Drop for Metric {
    fn drop(&mut self) {
        // SAFETY: the metric is ours and deleted exactly once; its family is still alive
        // (this metric holds it).
        if let Err(error) = check(unsafe { sys::TRITONSERVER_MetricDelete(self.raw.as_ptr()) }) {
            crate::log_error!(
                "failed to delete a metric of '{}': {error}",
                self.family.name
            );
        }
    }
}

/// A string label, as Triton takes it: a parameter, deleted on drop.
struct Label(NonNull<sys::TRITONSERVER_Parameter>);

impl Label {
    fn new(key: &str, value: &str) -> Result<Self> {
        let c_key = c_string("metric label name", key)?;
        let c_value = c_string("metric label value", value)?;
        // SAFETY: both strings are NUL-terminated and outlive the call; Triton copies a
        // string parameter's value.
        let raw = unsafe {
            sys::TRITONSERVER_ParameterNew(
                c_key.as_ptr(),
                sys::TRITONSERVER_PARAMETER_STRING,
                c_value.as_ptr().cast::<c_void>(),
            )
        };
        NonNull::new(raw)
            .map(Label)
            .ok_or_else(|| Error::internal(format!("Triton could not make label '{key}'")))
    }
}

impl Drop for Label {
    fn drop(&mut self) {
        // SAFETY: the parameter is ours and deleted exactly once.
        unsafe { sys::TRITONSERVER_ParameterDelete(self.0.as_ptr()) }
    }
}

/// A histogram's bucket bounds, as Triton takes them; deleted on drop.
struct HistogramArgs(NonNull<sys::TRITONSERVER_MetricArgs>);

impl HistogramArgs {
    fn new(buckets: &[f64]) -> Result<Self> {
        if buckets.is_empty() || buckets.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(Error::invalid_arg(format!(
                "histogram buckets must be increasing and not empty (got {buckets:?})"
            )));
        }
        let mut raw = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the args it receives become ours.
        check(unsafe { sys::TRITONSERVER_MetricArgsNew(&mut raw) })?;
        let args = NonNull::new(raw)
            .map(HistogramArgs)
            .ok_or_else(|| Error::internal("Triton returned no metric arguments"))?;
        // SAFETY: the args are live; the slice holds `len` values and Triton copies them.
        check(unsafe {
            sys::TRITONSERVER_MetricArgsSetHistogram(
                args.0.as_ptr(),
                buckets.as_ptr(),
                buckets.len() as u64,
            )
        })?;
        Ok(args)
    }
}

impl Drop for HistogramArgs {
    fn drop(&mut self) {
        // SAFETY: the args are ours and deleted exactly once.
        if let Err(error) = check(unsafe { sys::TRITONSERVER_MetricArgsDelete(self.0.as_ptr()) }) {
            crate::log_error!("failed to delete metric arguments: {error}");
        }
    }
}
