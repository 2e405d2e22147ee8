//! Tensor-core tiles chosen on the device (issue 6): every tensor-core convolution GEMM of a
//! schedule is timed with each [`TcTile::CANDIDATES`] tile on this GPU, and the fastest is kept,
//! cached on disk by (GPU, GEMM).
//!
//! The search builds the schedule once per candidate tile with every GEMM at that tile
//! ([`Tiles::all`]), loads it, and times each GEMM launch alone with CUDA events (one launch
//! to warm up, then the median of [`REPS`]; a split-K GEMM with the launch that sums its
//! slices, whose cost grows with the split). Buffers hold whatever the allocation held:
//! timing does not depend on the values (no data-dependent control flow in these kernels).
//! Then each GEMM gets its fastest tile; a tie keeps the earlier candidate (the default
//! first). Keys ([`wrnc_compiler::schedule::KernelSpec::tile_key`]) name the kernel, its
//! channels and the batch, so one entry serves every network with that convolution.
//!
//! The cache is one JSON file per GPU model (`<cache dir>/tiles/<gpu>-sm<cc>.json`, written
//! atomically) mapping keys to the chosen tile and the times measured. Where every GEMM of
//! a run is in it, nothing is searched.
//!
//! With no GPU nothing is tuned: schedules use [`TcTile::DEFAULT`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use wrnc_compiler::graph::Graph;
use wrnc_compiler::schedule::{self, KernelSpec, Options, TcTile, Tiles};

use super::bench::hyper;
use super::cache::ModuleCache;
use super::device::Gpu;
use super::exec::{Executor, Shared};
use super::CudaError;

/// Timed launches per GEMM and tile (after one warm-up launch).
pub const REPS: usize = 5;

/// How a run picks its tensor-core tiles (`--tiles`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileMode {
    /// Search on this GPU what the cache lacks (the default on a GPU).
    Auto,
    /// [`TcTile::DEFAULT`] everywhere (no search).
    Default,
    /// One tile for every GEMM.
    Fixed(TcTile),
}

impl TileMode {
    /// `auto`, `default` or a tile such as `128x64` (one of [`TcTile::CANDIDATES`]).
    pub fn parse(s: &str) -> Result<TileMode, String> {
        match s.trim() {
            "auto" => Ok(TileMode::Auto),
            "default" => Ok(TileMode::Default),
            t => TcTile::parse(t).map(TileMode::Fixed).ok_or_else(|| {
                format!(
                    "unknown tile mode `{t}`: use auto, default or one of {}",
                    TcTile::CANDIDATES.map(|c| c.to_string()).join(", ")
                )
            }),
        }
    }
}

/// One GEMM's entry: the tile chosen and the median microseconds of every candidate timed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Choice {
    pub tile: String,
    pub us: BTreeMap<String, f64>,
}

/// What [`choose_tiles`] did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TuneReport {
    /// `auto`, `default` or the fixed tile.
    pub mode: String,
    /// Distinct tensor-core GEMMs of the schedules.
    pub gemms: usize,
    /// Of those, how many were timed now (the rest came from the cache).
    pub searched: usize,
    /// Seconds the search took (0 when nothing was searched).
    pub search_s: f64,
    /// The cache file, when there is a cache.
    pub cache: Option<String>,
    /// A warning when the cache could not be written (the run goes on).
    pub warning: Option<String>,
    /// Every GEMM's tile, by key.
    pub tiles: BTreeMap<String, String>,
}

/// The cache file for `gpu` under the PTX cache's folder, one per engine: `-wgmma` for
/// Hopper's warpgroup MMA, `-tma` for its weights by TMA ([`Tiles::tma`]), `-k64` for its
/// stages of 64 ([`Tiles::k64`]), `-s<n>` for `n` pipeline stages ([`Tiles::stages`]),
/// `-nosk` without split-K ([`Tiles::no_split_k`]).
pub fn cache_path(
    gpu: &Gpu,
    cache: &ModuleCache,
    wgmma: bool,
    tma: bool,
    k64: bool,
    stages: u32,
    no_split_k: bool,
) -> Option<PathBuf> {
    let info = gpu.info();
    let slug: String = info
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug
        .split('-')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let (ma, mi) = info.compute_capability;
    cache.root().map(|d| {
        d.join("tiles").join(format!(
            "{slug}-sm{ma}{mi}{}{}{}{}{}.json",
            if wgmma { "-wgmma" } else { "" },
            if tma { "-tma" } else { "" },
            if k64 { "-k64" } else { "" },
            if stages != 0 {
                format!("-s{stages}")
            } else {
                String::new()
            },
            // a tile timed on split-K launches is not the one for the whole reductions
            if no_split_k { "-nosk" } else { "" }
        ))
    })
}

fn load(path: &Option<PathBuf>) -> BTreeMap<String, Choice> {
    path.as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// The tensor-core engine the bases ask for (`wgmma`, `tma`, `k64`, `stages`, the f32
/// engine): the search times candidate tiles on it.
struct Engine {
    wgmma: bool,
    tma: bool,
    k64: bool,
    stages: u32,
    f32_math: schedule::F32Math,
    dense_dgrad: bool,
    no_split_k: bool,
}

impl Engine {
    fn of(bases: &[Options]) -> Engine {
        Engine {
            wgmma: bases.iter().any(|o| o.tiles.wgmma),
            tma: bases.iter().any(|o| o.tiles.tma),
            k64: bases.iter().any(|o| o.tiles.k64),
            stages: bases.iter().map(|o| o.tiles.stages).max().unwrap_or(0),
            dense_dgrad: bases.iter().any(|o| o.tiles.dense_dgrad),
            no_split_k: bases.iter().any(|o| o.tiles.no_split_k),
            f32_math: bases
                .iter()
                .map(|o| o.tiles.f32_math())
                .find(|m| m.tensor_cores())
                .unwrap_or_default(),
        }
    }

    /// `o`'s schedule with `tiles` on this engine.
    fn build(
        &self,
        graph: &Graph,
        o: &Options,
        tiles: Tiles,
    ) -> Result<schedule::Schedule, CudaError> {
        let tiles = Tiles {
            wgmma: self.wgmma,
            tma: self.tma,
            k64: self.k64,
            stages: self.stages,
            dense_dgrad: self.dense_dgrad,
            no_split_k: self.no_split_k,
            ..tiles
        }
        .with_f32_math(self.f32_math);
        schedule::build(graph, &Options { tiles, ..o.clone() })
            .map_err(|e| CudaError::Plan(e.message))
    }
}

/// The search's schedules: for each candidate tile (in [`TcTile::CANDIDATES`] order) and
/// base, the schedule with every GEMM at that tile, and which of its launches time which of
/// the `missing` keys (each key and tile timed once: in the first schedule holding it). With
/// `smem_optin` (the GPU's limit per block), a candidate whose ring needs more shared memory
/// than that is left out (the kernels beside a dynamic ring declare at most 4 KiB statically:
/// `codegen_nvrtc`).
#[allow(clippy::type_complexity)]
fn search_runs<'a>(
    graph: &Graph,
    bases: &'a [Options],
    missing: &[&String],
    smem_optin: Option<u64>,
) -> Result<
    Vec<(
        TcTile,
        &'a Options,
        schedule::Schedule,
        Vec<(usize, String)>,
    )>,
    CudaError,
> {
    let engine = Engine::of(bases);
    let mut runs = vec![];
    let mut planned: Vec<(String, TcTile)> = vec![];
    for t in TcTile::CANDIDATES {
        for o in bases {
            let s = engine.build(graph, o, Tiles::all(t))?;
            if smem_optin.is_some_and(|optin| {
                s.launches
                    .iter()
                    .any(|l| l.shared > 0 && l.shared as u64 + 4096 > optin)
            }) {
                continue;
            }
            let todo: Vec<(usize, String)> = s
                .tile_keys()
                .into_iter()
                .filter(|(_, k)| {
                    let fresh = missing.contains(&k) && !planned.contains(&(k.clone(), t));
                    if fresh {
                        planned.push((k.clone(), t));
                    }
                    fresh
                })
                .collect();
            if !todo.is_empty() {
                runs.push((t, o, s, todo));
            }
        }
    }
    Ok(runs)
}

/// The modules a tile search for `bases` of `graph` may compile (no GPU needed; `wrnc
/// precompile`): every candidate tile's schedule of every base, a superset of
/// `search_runs`'s whatever the tile cache holds and whichever candidates the GPU's shared
/// memory rules out. The modules built afterwards, at the tiles the search picks, depend on
/// its timings.
pub fn search_sources(
    graph: &Graph,
    bases: &[Options],
) -> Result<Vec<super::exec::ModuleSource>, CudaError> {
    let engine = Engine::of(bases);
    let mut sources = vec![];
    for t in TcTile::CANDIDATES {
        for o in bases {
            let s = engine.build(graph, o, Tiles::all(t))?;
            sources.push(super::exec::module_source(&s, &o.fusion)?);
        }
    }
    Ok(sources)
}

/// The tiles [`choose_tiles`] gives `bases` without searching: every GEMM at the default or
/// the fixed tile, on the bases' engine; `None` for [`TileMode::Auto`].
pub fn fixed_tiles(bases: &[Options], mode: TileMode) -> Option<Tiles> {
    let t = match mode {
        TileMode::Default => TcTile::DEFAULT,
        TileMode::Fixed(t) => t,
        TileMode::Auto => return None,
    };
    let e = Engine::of(bases);
    Some(
        Tiles {
            wgmma: e.wgmma,
            tma: e.tma,
            k64: e.k64,
            stages: e.stages,
            dense_dgrad: e.dense_dgrad,
            no_split_k: e.no_split_k,
            ..Tiles::all(t)
        }
        .with_f32_math(e.f32_math),
    )
}

/// The tiles for the schedules `bases` of `graph` (their `tiles` are ignored) on `gpu`, as
/// `mode` says; see the module documentation.
pub fn choose_tiles(
    gpu: &Gpu,
    cache: &ModuleCache,
    graph: &Graph,
    bases: &[Options],
    mode: TileMode,
) -> Result<(Tiles, TuneReport), CudaError> {
    let engine = Engine::of(bases);
    let (wgmma, tma, stages, f32_math) = (engine.wgmma, engine.tma, engine.stages, engine.f32_math);
    let build = |o: &Options, tiles: Tiles| engine.build(graph, o, tiles);
    let mut keys = vec![];
    for o in bases {
        for (_, k) in build(o, Tiles::default())?.tile_keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let path = cache_path(
        gpu,
        cache,
        wgmma,
        tma,
        engine.k64,
        stages,
        engine.no_split_k,
    );
    let mut report = TuneReport {
        mode: match mode {
            TileMode::Auto => "auto".into(),
            TileMode::Default => "default".into(),
            TileMode::Fixed(t) => t.to_string(),
        },
        gemms: keys.len(),
        searched: 0,
        search_s: 0.0,
        cache: path.as_ref().map(|p| p.display().to_string()),
        warning: None,
        tiles: BTreeMap::new(),
    };
    let fixed = match mode {
        TileMode::Default => Some(TcTile::DEFAULT),
        TileMode::Fixed(t) => Some(t),
        TileMode::Auto => None,
    };
    if let (Some(t), Some(tiles)) = (fixed, fixed_tiles(bases, mode)) {
        report.tiles = keys.iter().map(|k| (k.clone(), t.to_string())).collect();
        return Ok((tiles, report));
    }
    let mut cached = load(&path);
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            cached
                .get(*k)
                .is_none_or(|c| TcTile::parse(&c.tile).is_none())
        })
        .collect();
    if !missing.is_empty() {
        let t0 = std::time::Instant::now();
        // times[key][candidate] = median microseconds
        let mut times: BTreeMap<String, BTreeMap<TcTile, f64>> = BTreeMap::new();
        let optin = gpu.info().smem_optin_bytes as u64;
        let runs = search_runs(graph, bases, &missing, Some(optin))?;
        // every candidate module compiled at once, on all cores, before any is timed
        let sources = runs
            .iter()
            .map(|(_, o, s, _)| super::exec::module_source(s, &o.fusion))
            .collect::<Result<Vec<_>, _>>()?;
        super::exec::precompile(gpu, cache, sources, super::exec::compile_threads())?;
        // a candidate this GPU refuses (e.g. more shared memory than a block may have, which
        // only a real GPU's static sizes show) is skipped, not the whole search; a kernel
        // fault poisons the context and ends it
        let skip = |t: TcTile, e: CudaError| -> Result<(), CudaError> {
            if e.poisons_context() {
                return Err(e);
            }
            eprintln!("warning: tile {t} not timed: {e}");
            Ok(())
        };
        for (t, o, s, todo) in runs {
            let mut shared = Shared::new();
            let ex = match Executor::new(gpu, s, &o.fusion, &mut shared, cache) {
                Ok(ex) => ex,
                Err(e) => {
                    skip(t, e)?;
                    continue;
                }
            };
            // a split-K GEMM's time includes the launch after it that sums its slices
            let time = |li: usize| -> Result<f64, CudaError> {
                let mut us = ex.time_launch(gpu, &hyper(0), li, REPS)?;
                let sums = ex.schedule.launches.get(li + 1).is_some_and(|l| {
                    matches!(
                        ex.schedule.kernels[l.kernel].spec,
                        KernelSpec::SplitKReduce | KernelSpec::SplitKEpilogue { .. }
                    )
                });
                if sums {
                    us += ex.time_launch(gpu, &hyper(0), li + 1, REPS)?;
                }
                Ok(us)
            };
            for (li, k) in todo {
                match time(li) {
                    Ok(us) => {
                        times.entry(k).or_default().insert(t, us);
                    }
                    Err(e) => skip(t, e)?,
                }
            }
        }
        for k in &missing {
            let m = times.get(*k).cloned().unwrap_or_default();
            // the fastest; on a tie the earlier candidate (the default first)
            let best = TcTile::CANDIDATES
                .into_iter()
                .filter(|t| m.get(t).is_some_and(|v| v.is_finite()))
                .fold(None, |b: Option<(TcTile, f64)>, t| match b {
                    Some((_, bv)) if bv <= m[&t] => b,
                    _ => Some((t, m[&t])),
                })
                .map_or(TcTile::DEFAULT, |(t, _)| t);
            cached.insert(
                (*k).clone(),
                Choice {
                    tile: best.to_string(),
                    us: m.iter().map(|(t, v)| (t.to_string(), *v)).collect(),
                },
            );
        }
        report.searched = missing.len();
        report.search_s = t0.elapsed().as_secs_f64();
        if let Some(p) = &path {
            let text = serde_json::to_string_pretty(&cached).expect("plain data");
            let dir = p.parent().expect("a file in a folder");
            if let Err(e) = super::cache::write_atomic(dir, p, text.as_bytes()) {
                report.warning = Some(format!("cannot write the tile cache {}: {e}", p.display()));
            }
        }
    }
    let mut tiles = Tiles {
        wgmma,
        tma,
        k64: engine.k64,
        stages,
        dense_dgrad: engine.dense_dgrad,
        no_split_k: engine.no_split_k,
        ..Tiles::default()
    }
    .with_f32_math(f32_math);
    for k in &keys {
        let t = cached
            .get(k)
            .and_then(|c| TcTile::parse(&c.tile))
            .unwrap_or(TcTile::DEFAULT);
        tiles.by_key.insert(k.clone(), t);
        report.tiles.insert(k.clone(), t.to_string());
    }
    Ok((tiles, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_modes_parse_and_bad_ones_say_what_exists() {
        assert_eq!(TileMode::parse("auto"), Ok(TileMode::Auto));
        assert_eq!(TileMode::parse("default"), Ok(TileMode::Default));
        assert_eq!(
            TileMode::parse("128x64"),
            Ok(TileMode::Fixed(TcTile {
                rows: 128,
                cols: 64
            }))
        );
        assert_eq!(
            TileMode::parse("128x128"),
            Ok(TileMode::Fixed(TcTile {
                rows: 128,
                cols: 128
            }))
        );
        for bad in ["100x7", "256x64", "x", "", "64"] {
            let e = TileMode::parse(bad).unwrap_err();
            assert!(e.contains("64x32"), "{bad}: {e}");
        }
    }

    /// A damaged or foreign cache file is no cache (the GEMMs are searched again and the file
    /// rewritten), never a panic; a missing one likewise.
    #[test]
    fn a_damaged_tile_cache_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        for text in ["", "{not json", "[1, 2]", "{\"k\": {\"tile\": 5}}"] {
            std::fs::write(&p, text).unwrap();
            assert!(load(&Some(p.clone())).is_empty(), "{text:?}");
        }
        assert!(load(&Some(dir.path().join("missing.json"))).is_empty());
        let good = r#"{"k": {"tile": "128x64", "us": {"64x64": 2.0, "128x64": 1.0}}}"#;
        std::fs::write(&p, good).unwrap();
        assert_eq!(
            load(&Some(p)).get("k").map(|c| c.tile.as_str()),
            Some("128x64")
        );
    }
}
