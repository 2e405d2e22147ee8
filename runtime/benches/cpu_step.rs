//! Placeholder; the WRN-16-4 training-step benchmark lands here.
fn main() {}
