//! The float type the CPU reference computes in: f32 for training, f64 for gradient checks.

pub trait Real:
    num_traits::Float + num_traits::FromPrimitive + Default + Send + Sync + std::fmt::Debug + 'static
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

/// Rows processed per rayon task when a kernel parallelizes over rows: enough work per
/// task that scheduling costs nothing, few enough that 2+ cores stay busy.
pub fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).clamp(1, 4096)
}
