//! Batch assembly on the GPU: the data set lives on the device (uploaded once, as bytes); per
//! step the host uploads the batch's image indices and one kernel writes the network's input
//! (pad-crop-flip when augmenting, then normalisation) and the labels.
//!
//! Bit-identical to [`crate::data::make_batch`]: the same [`wrnc_compiler::rng::bits`] keys
//! (seed = low 32 bits of the augmentation seed, step = high 32 bits, stream
//! `data.augment`, index = the image's index in the data set), the same crop/flip arithmetic,
//! and the normalisation as the same per-channel 256-entry `f32` table computed on the host.
//! In bf16 the value is rounded to bf16 on store, as the CPU side's input would be.

use wrnc_compiler::ast::Precision;
use wrnc_compiler::codegen::cuda::COMMON_CUH;
use wrnc_compiler::rng;

use super::device::{DeviceBuffer, Gpu, Module};
use super::layout::ArgValue;
use super::CudaError;
use crate::data::{Dataset, Normalization, PAD_PIXELS};

/// The kernel's name.
pub const KERNEL: &str = "wrnc_augment";

const BODY: &str = r#"
extern "C" __global__ void wrnc_augment(act_t* __restrict__ out, int* __restrict__ labels_out,
        const unsigned char* __restrict__ images, const int* __restrict__ labels,
        const unsigned int* __restrict__ indices, const float* __restrict__ lut,
        int n, int C, int H, int W, int augment, unsigned int seed, unsigned int step,
        unsigned int stream, int pad) {
    const int total = n * C * H * W;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int x = i % W, t = i / W, y = t % H, t2 = t / H, ch = t2 % C, b = t2 / C;
        const unsigned int idx = indices[b];
        int dy = 0, dx = 0, flip = 0;
        if (augment) {
            const unsigned int r = wrnc_bits(seed, stream, step, idx);
            const unsigned int span = 2u * (unsigned int)pad + 1u;
            dy = (int)(r % span) - pad;
            dx = (int)((r / span) % span) - pad;
            flip = (int)((r >> 31) & 1u);
        }
        const int xx = flip ? W - 1 - x : x;
        const int sy = y + dy, sx = xx + dx;
        unsigned int v = 0;
        if (sy >= 0 && sy < H && sx >= 0 && sx < W)
            v = images[(unsigned long long)idx * (unsigned long long)(C * H * W) + (unsigned long long)((ch * H + sy) * W + sx)];
        wrnc_st(out, i, lut[ch * 256 + (int)v]);
        if (ch == 0 && y == 0 && x == 0) labels_out[b] = labels[idx];
    }
}
"#;

/// The CUDA source of the augmentation kernel for `precision`.
pub fn source(precision: Precision) -> String {
    let mut s = String::from("// wrnc: batch assembly and augmentation\n");
    if precision == Precision::Bf16 {
        s.push_str("#define WRNC_BF16 1\n");
    }
    s.push_str(rng::CUDA_SOURCE);
    s.push_str(COMMON_CUH);
    s.push_str(BODY);
    s
}

/// The normalisation table: `lut[c * 256 + v] = (v / 255 - mean[c]) / std[c]`, in `f32`
/// exactly as [`crate::data::make_batch`] computes it.
pub fn lut(norm: &Normalization) -> Vec<f32> {
    let mut t = Vec::with_capacity(norm.mean.len() * 256);
    for ch in 0..norm.mean.len() {
        for v in 0..256 {
            t.push((v as f32 / 255.0 - norm.mean[ch]) / norm.std[ch]);
        }
    }
    t
}

/// A data set on the device.
pub struct DeviceDataset {
    images: DeviceBuffer,
    labels: DeviceBuffer,
    lut: DeviceBuffer,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl DeviceDataset {
    /// Uploads `ds` and its normalisation table.
    pub fn upload(gpu: &Gpu, ds: &Dataset, norm: &Normalization) -> Result<Self, CudaError> {
        if norm.mean.len() != ds.c || norm.std.len() != ds.c {
            return Err(CudaError::Input(format!(
                "normalisation has {} channels, the data {}",
                norm.mean.len(),
                ds.c
            )));
        }
        let per = ds.c * ds.h * ds.w;
        if ds.images.len() != ds.n * per || ds.labels.len() != ds.n {
            return Err(CudaError::Input(
                "the data set's arrays do not match n".into(),
            ));
        }
        if ds.n > u32::MAX as usize || per.checked_mul(256).is_none_or(|v| v > i32::MAX as usize) {
            return Err(CudaError::Input(
                "the data set is too large for the GPU loader".into(),
            ));
        }
        let what = "the data set";
        let images = gpu.alloc(ds.images.len() as u64, what, 0)?;
        gpu.upload(images.ptr(), &ds.images)?;
        let lab: Vec<u8> = ds
            .labels
            .iter()
            .flat_map(|&l| (l as i32).to_le_bytes())
            .collect();
        let labels = gpu.alloc(lab.len() as u64, what, 0)?;
        gpu.upload(labels.ptr(), &lab)?;
        let t: Vec<u8> = lut(norm).iter().flat_map(|v| v.to_le_bytes()).collect();
        let lut = gpu.alloc(t.len() as u64, what, 0)?;
        gpu.upload(lut.ptr(), &t)?;
        Ok(DeviceDataset {
            images,
            labels,
            lut,
            n: ds.n,
            c: ds.c,
            h: ds.h,
            w: ds.w,
        })
    }
}

/// The compiled kernel and a device buffer for one batch's indices.
pub struct Augmenter {
    module: Module,
    indices: DeviceBuffer,
    capacity: usize,
}

impl Augmenter {
    /// Compiles the kernel for `precision`, with room for batches of up to `capacity` images.
    pub fn new(
        gpu: &Gpu,
        precision: Precision,
        capacity: usize,
        cache: &super::cache::ModuleCache,
    ) -> Result<Augmenter, CudaError> {
        let module = super::exec::load_source(gpu, cache, &source(precision), &[KERNEL.into()])?;
        let indices = gpu.alloc(4 * capacity.max(1) as u64, "the batch indices", 0)?;
        Ok(Augmenter {
            module,
            indices,
            capacity,
        })
    }

    /// Writes images `indices` of `ds` into `out` (the schedule's input buffer, `pad_to`
    /// images; rows past `indices.len()` repeat the first image) and their labels into
    /// `labels_out`. `rng_seed` as in [`crate::data::make_batch`].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        gpu: &Gpu,
        ds: &DeviceDataset,
        indices: &[usize],
        pad_to: usize,
        augment: bool,
        rng_seed: u64,
        out: u64,
        labels_out: u64,
    ) -> Result<(), CudaError> {
        if indices.is_empty() || indices.len() > pad_to || pad_to > self.capacity {
            return Err(CudaError::Input(format!(
                "a batch of {} images padded to {pad_to} does not fit the loader ({})",
                indices.len(),
                self.capacity
            )));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= ds.n) {
            return Err(CudaError::Input(format!(
                "image index {bad} out of range for a data set of {}",
                ds.n
            )));
        }
        let mut idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        idx.resize(pad_to, idx[0]);
        let bytes: Vec<u8> = idx.iter().flat_map(|v| v.to_le_bytes()).collect();
        gpu.upload(self.indices.ptr(), &bytes)?;
        let total = (pad_to * ds.c * ds.h * ds.w) as u64;
        let blocks = total.div_ceil(256).clamp(1, 4096) as u32;
        let args = [
            ArgValue::Ptr(out),
            ArgValue::Ptr(labels_out),
            ArgValue::Ptr(ds.images.ptr()),
            ArgValue::Ptr(ds.labels.ptr()),
            ArgValue::Ptr(self.indices.ptr()),
            ArgValue::Ptr(ds.lut.ptr()),
            ArgValue::I32(pad_to as i32),
            ArgValue::I32(ds.c as i32),
            ArgValue::I32(ds.h as i32),
            ArgValue::I32(ds.w as i32),
            ArgValue::I32(augment as i32),
            ArgValue::U32(rng_seed as u32),
            ArgValue::U32((rng_seed >> 32) as u32),
            ArgValue::U32(rng::stream_id("data.augment")),
            ArgValue::I32(PAD_PIXELS as i32),
        ];
        gpu.launch(
            &self.module,
            0,
            [blocks, 1, 1],
            [256, 1, 1],
            0,
            &args,
            KERNEL,
            "batch assembly",
        )
    }
}
