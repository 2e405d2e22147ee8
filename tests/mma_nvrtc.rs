//! The tensor-core convolution kernels (`wrnc_compiler::codegen::mma`) compile with NVRTC for
//! sm_80 and sm_90, and the PTX holds the instructions they are built on (mma.sync m16n8k16
//! bf16, ldmatrix x4 and x4.trans, cp.async with commit / wait groups). Skips (with the reason
//! printed) when libnvrtc cannot be loaded, except under CI (`CI` set), where that fails.

use wrnc_compiler::codegen::mma::{self, MmaConv, OutType, Pass};
use wrnc_runtime::nvrtc;

fn nvrtc_available() -> bool {
    match nvrtc::library() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set and NVRTC is missing: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// `(kernel names, source)` for every pass and option set, on a WRN-like 3x3 conv and a 1x1
/// stride-2 shortcut, with the default tiles of batch 128.
fn sources() -> Vec<(Vec<String>, String)> {
    let mut v = Vec::new();
    for (i, base) in [
        MmaConv::new(160, 160, 32, 32, 3, 1, 1),
        MmaConv::new(160, 320, 32, 32, 1, 2, 0),
        MmaConv::new(16, 16, 8, 8, 3, 2, 1),
    ]
    .into_iter()
    .enumerate()
    {
        for out in [OutType::Bf16, OutType::F32] {
            let f = MmaConv {
                out,
                prologue: true,
                residual: true,
                stats: true,
                ..base.with_default_tile(Pass::Fwd, 128)
            };
            let name = format!("fwd_{i}_{out:?}");
            v.push((vec![name.clone()], mma::conv_fwd_kernel(&name, &f).unwrap()));
            let plain = MmaConv {
                out,
                ..base.with_default_tile(Pass::Fwd, 128)
            };
            let name = format!("fwd_plain_{i}_{out:?}");
            v.push((
                vec![name.clone()],
                mma::conv_fwd_kernel(&name, &plain).unwrap(),
            ));
            let d = MmaConv {
                out,
                accumulate: out == OutType::F32,
                ..base.with_default_tile(Pass::BwdData, 128)
            };
            let name = format!("dgrad_{i}_{out:?}");
            v.push((
                vec![name.clone()],
                mma::conv_bwd_data_kernel(&name, &d).unwrap(),
            ));
        }
        let w = MmaConv {
            prologue: true,
            ..base.with_default_tile(Pass::BwdWeight, 128)
        };
        let name = format!("wgrad_{i}");
        let mut names = vec![name.clone()];
        if w.split_k > 1 {
            names.push(format!("{name}_reduce"));
        }
        v.push((names, mma::conv_bwd_weight_kernel(&name, &w).unwrap()));
    }
    v
}

#[test]
fn mma_kernels_compile_for_sm80_and_sm90() {
    if !nvrtc_available() {
        return;
    }
    let srcs = sources();
    assert!(
        srcs.iter().any(|(n, _)| n.len() == 2),
        "no split-K weight gradient"
    );
    for arch in ["sm_80", "sm_90"] {
        for (names, src) in &srcs {
            let ptx = nvrtc::compile_ptx(src, arch)
                .unwrap_or_else(|e| panic!("{names:?} {arch}: {e}\n{src}"));
            for n in names {
                assert!(
                    ptx.contains(&format!(".entry {n}(")),
                    "{n} {arch}: no entry"
                );
            }
            for ins in [
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                "ldmatrix.sync.aligned.m8n8.x4",
                "cp.async.cg.shared.global",
                "cp.async.commit_group",
                "cp.async.wait_group",
            ] {
                assert!(ptx.contains(ins), "{names:?} {arch}: no {ins} in the PTX");
            }
            if !names[0].starts_with("fwd") {
                let t = "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16";
                assert!(ptx.contains(t), "{names:?} {arch}: no {t}");
            }
            // Informational: a local-memory depot means some array (accumulators, fragments)
            // was not kept in registers.
            if arch == "sm_80" {
                eprintln!(
                    "{}: local memory depot: {}",
                    names[0],
                    ptx.contains("__local_depot")
                );
            }
        }
    }
}
