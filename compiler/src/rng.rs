//! The counter-based generator shared by every backend.
//!
//! A random bit is a pure function of `(seed, stream, step, index)`: the CPU reference, the
//! generated CUDA and the emulation all compute the same bits, and a dropout mask can be
//! regenerated in backward instead of stored. `stream` identifies the op (FNV-1a of its node
//! name, so fused and unfused graphs agree); `index` is the element (dropout) or the sample
//! (stochastic depth) within the step's batch.
//!
//! The mixing function is integer-only (32-bit multiply, xor, shift), so its CUDA twin
//! [`CUDA_SOURCE`] is bit-exact.

/// FNV-1a (32-bit) of a node name: the op's stream id.
pub fn stream_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[inline]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// 32 random bits for one element.
#[inline]
pub fn bits(seed: u32, stream: u32, step: u32, index: u32) -> u32 {
    let mut h = fmix(seed ^ 0x9e37_79b9);
    h = fmix(h ^ stream);
    h = fmix(h ^ step.wrapping_mul(0x2545_f491));
    fmix(h ^ index.wrapping_mul(0x27d4_eb2f))
}

/// Uniform in [0, 1) with 24 bits of resolution.
#[inline]
pub fn uniform(seed: u32, stream: u32, step: u32, index: u32) -> f32 {
    (bits(seed, stream, step, index) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// True when the element is kept, with probability `keep`.
#[inline]
pub fn keep(seed: u32, stream: u32, step: u32, index: u32, keep: f32) -> bool {
    uniform(seed, stream, step, index) < keep
}

/// The same functions in CUDA C (device code). Kept beside the Rust so they cannot drift; the
/// emulation tests check they agree bit for bit.
pub const CUDA_SOURCE: &str = r#"
__device__ __forceinline__ unsigned int wrnc_fmix(unsigned int h) {
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16; return h;
}
__device__ __forceinline__ unsigned int wrnc_bits(unsigned int seed, unsigned int stream,
                                                   unsigned int step, unsigned int index) {
    unsigned int h = wrnc_fmix(seed ^ 0x9e3779b9u);
    h = wrnc_fmix(h ^ stream);
    h = wrnc_fmix(h ^ (step * 0x2545f491u));
    return wrnc_fmix(h ^ (index * 0x27d4eb2fu));
}
__device__ __forceinline__ float wrnc_uniform(unsigned int seed, unsigned int stream,
                                              unsigned int step, unsigned int index) {
    return (float)(wrnc_bits(seed, stream, step, index) >> 8) * (1.0f / 16777216.0f);
}
__device__ __forceinline__ bool wrnc_keep(unsigned int seed, unsigned int stream, unsigned int step,
                                          unsigned int index, float keep) {
    return wrnc_uniform(seed, stream, step, index) < keep;
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_matches_probability() {
        let n = 100_000;
        let kept = (0..n)
            .filter(|&i| keep(1, stream_id("3.body.4"), 7, i, 0.7))
            .count();
        let rate = kept as f64 / n as f64;
        assert!((rate - 0.7).abs() < 0.01, "rate {rate}");
    }

    #[test]
    fn streams_and_steps_differ() {
        let a: Vec<u32> = (0..64).map(|i| bits(1, 2, 3, i)).collect();
        let b: Vec<u32> = (0..64).map(|i| bits(1, 2, 4, i)).collect();
        let c: Vec<u32> = (0..64).map(|i| bits(1, 5, 3, i)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, (0..64).map(|i| bits(1, 2, 3, i)).collect::<Vec<_>>());
    }
}
