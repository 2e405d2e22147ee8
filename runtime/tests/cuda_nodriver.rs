//! Without a CUDA driver (here: `WRNC_LIBCUDA` points at a file that does not exist), the GPU
//! path reports an error that says what to install, and never panics. One test per process:
//! the driver is loaded once per process.

use wrnc_runtime::cuda::{self, CudaError};

#[test]
fn missing_driver_is_an_error_that_says_what_to_install() {
    std::env::set_var("WRNC_LIBCUDA", "/nonexistent/libcuda.so.1");
    let e = cuda::is_available().expect_err("a bogus driver path cannot give a GPU");
    assert!(matches!(e, CudaError::NoDriver { .. }), "{e:?}");
    let msg = e.to_string();
    for needle in [
        "/nonexistent/libcuda.so.1",
        "Install the NVIDIA driver",
        "WRNC_LIBCUDA",
        "--device cpu",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    // asking again gives the same answer (cached), still without panicking
    assert_eq!(cuda::is_available().unwrap_err(), e);
    // opening a trainer's GPU fails the same way
    assert!(matches!(
        cuda::device::Gpu::open(0),
        Err(CudaError::NoDriver { .. })
    ));
    // and so does the GPU trainer, before compiling anything
    let g = wrnc_grammar::build(&wrnc_grammar::Source::inline(
        "network \"t\" { input 3x8x8 classes 3 conv(3x3, 4) bn relu gap fc }",
    ))
    .unwrap();
    let e = cuda::trainer::GpuTrainer::new(
        0,
        &g,
        4,
        4,
        wrnc_compiler::ast::Precision::F32,
        Default::default(),
        1,
        cuda::tune::TileMode::Auto,
        Default::default(),
        Default::default(),
    )
    .err()
    .expect("no GPU trainer without a driver");
    assert!(
        matches!(
            e,
            cuda::trainer::GpuTrainError::Cuda(CudaError::NoDriver { .. })
        ),
        "{e:?}"
    );
    // bad batch sizes are refused as configuration errors first
    let e = cuda::trainer::GpuTrainer::new(
        0,
        &g,
        0,
        4,
        wrnc_compiler::ast::Precision::F32,
        Default::default(),
        1,
        cuda::tune::TileMode::Auto,
        Default::default(),
        Default::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("batch sizes"), "{e}");
    // so is 3xTF32 (or TF32) with bf16 (its convolutions are on the tensor cores already)
    let e = cuda::trainer::GpuTrainer::new(
        0,
        &g,
        4,
        4,
        wrnc_compiler::ast::Precision::Bf16,
        Default::default(),
        1,
        cuda::tune::TileMode::Auto,
        wrnc_compiler::schedule::F32Math::Tf32x3,
        Default::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("--tf32x3"), "{e}");
}
