//! Batching, augmentation and shuffling on a synthetic in-memory data set.

use std::collections::BTreeSet;

use wrnc_compiler::ast::Dataset as Kind;
use wrnc_runtime::data::{augment_seed, make_batch, shuffle, Dataset, Normalization, PAD_PIXELS};

/// `n` images of 3 x h x w, pixel = (i*13 + c*5 + y*w + x) % 256 (distinct per position).
fn synthetic(n: usize, h: usize, w: usize) -> Dataset {
    let mut images = Vec::new();
    for i in 0..n {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    images.push(((i * 13 + c * 5 + y * w + x) % 251 + 1) as u8);
                }
            }
        }
    }
    Dataset {
        images,
        labels: (0..n).map(|i| (i % 10) as u16).collect(),
        n,
        c: 3,
        h,
        w,
        classes: 10,
        class_names: (0..10).map(|i| i.to_string()).collect(),
    }
}

fn normalized(v: u8, c: usize, norm: &Normalization) -> f32 {
    (v as f32 / 255.0 - norm.mean[c]) / norm.std[c]
}

#[test]
fn without_augmentation_pixels_are_only_normalized() {
    let ds = synthetic(5, 8, 6);
    for kind in [Kind::Cifar10, Kind::Cifar100, Kind::Svhn] {
        let norm = Normalization::for_dataset(kind);
        let (x, y) = make_batch(&ds, &[4, 0, 2], false, 7, &norm);
        assert_eq!(x.shape, vec![3, 3, 8, 6]);
        assert_eq!(y, vec![4, 0, 2]);
        for (b, &i) in [4usize, 0, 2].iter().enumerate() {
            for (k, &v) in ds.image(i).iter().enumerate() {
                let c = k / 48;
                let got = x.data[b * 144 + k];
                assert!(
                    (got - normalized(v, c, &norm)).abs() < 1e-6,
                    "{kind:?} {b} {k}"
                );
            }
        }
    }
    // SVHN is x / 255 only.
    let n = Normalization::for_dataset(Kind::Svhn);
    assert_eq!((n.mean, n.std), (vec![0.0; 3], vec![1.0; 3]));
}

/// Finds the (dy, dx, flip) that turns image `i` into the batch's image `b`, if any.
fn find_transform(
    ds: &Dataset,
    i: usize,
    out: &[f32],
    norm: &Normalization,
) -> Option<(isize, isize, bool)> {
    let (h, w) = (ds.h as isize, ds.w as isize);
    let p = PAD_PIXELS as isize;
    let img = ds.image(i);
    for dy in -p..=p {
        for dx in -p..=p {
            for flip in [false, true] {
                let ok = (0..3usize).all(|c| {
                    (0..h).all(|y| {
                        (0..w).all(|x| {
                            let xx = if flip { w - 1 - x } else { x };
                            let (sy, sx) = (y + dy, xx + dx);
                            let v = if sy >= 0 && sy < h && sx >= 0 && sx < w {
                                img[c * (h * w) as usize + (sy * w + sx) as usize]
                            } else {
                                0
                            };
                            let got = out[c * (h * w) as usize + (y * w + x) as usize];
                            (got - normalized(v, c, norm)).abs() < 1e-6
                        })
                    })
                });
                if ok {
                    return Some((dy, dx, flip));
                }
            }
        }
    }
    None
}

#[test]
fn augmentation_is_a_padded_crop_and_flip_covering_every_offset() {
    let ds = synthetic(400, 12, 12);
    let norm = Normalization::for_dataset(Kind::Cifar10);
    let idx: Vec<usize> = (0..ds.n).collect();
    let (x, _) = make_batch(&ds, &idx, true, augment_seed(42, 3), &norm);
    let per = ds.image_len();
    let mut seen = BTreeSet::new();
    for i in 0..ds.n {
        let t = find_transform(&ds, i, &x.data[i * per..(i + 1) * per], &norm)
            .unwrap_or_else(|| panic!("image {i} is not a crop/flip of its source"));
        seen.insert(t);
    }
    // 9 x 9 offsets x 2 flips = 162 outcomes; 400 draws should hit most of them, and both
    // flips and the extreme offsets must occur.
    assert!(seen.len() > 120, "only {} distinct transforms", seen.len());
    assert!(seen.iter().any(|t| t.2) && seen.iter().any(|t| !t.2));
    assert!(seen.iter().any(|t| t.0 == -4) && seen.iter().any(|t| t.1 == 4));
}

#[test]
fn augmentation_is_deterministic_and_keyed_by_image() {
    let ds = synthetic(20, 32, 32);
    let norm = Normalization::for_dataset(Kind::Cifar10);
    let seed = augment_seed(1, 0);
    let (a, _) = make_batch(&ds, &[3, 5, 7], true, seed, &norm);
    let (b, _) = make_batch(&ds, &[3, 5, 7], true, seed, &norm);
    assert_eq!(a, b);
    // Image 5 is augmented the same wherever it sits in the batch.
    let (c, _) = make_batch(&ds, &[5], true, seed, &norm);
    assert_eq!(&a.data[3072..6144], c.data.as_slice());
    // Another epoch draws other crops.
    let (d, _) = make_batch(&ds, &[3, 5, 7], true, augment_seed(1, 1), &norm);
    assert_ne!(a, d);
}

#[test]
fn empty_batch() {
    let ds = synthetic(2, 4, 4);
    let (x, y) = make_batch(&ds, &[], true, 0, &Normalization::identity(3));
    assert_eq!((x.shape, x.data.len(), y.len()), (vec![0, 3, 4, 4], 0, 0));
}

#[test]
fn normalization_from_data() {
    let mut ds = synthetic(3, 4, 4);
    ds.images.iter_mut().for_each(|p| *p = 51); // 0.2 everywhere: std 0 -> 1
    let n = Normalization::from_data(&ds);
    for c in 0..3 {
        assert!((n.mean[c] - 0.2).abs() < 1e-6);
        assert_eq!(n.std[c], 1.0);
    }
}

#[test]
fn shuffle_is_a_deterministic_permutation() {
    for n in [0usize, 1, 2, 10, 1000] {
        let p = shuffle(n, 7, 0);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..n).collect::<Vec<_>>(), "n={n}");
        assert_eq!(p, shuffle(n, 7, 0));
    }
    let a = shuffle(1000, 7, 0);
    assert_ne!(a, shuffle(1000, 7, 1), "epochs differ");
    assert_ne!(a, shuffle(1000, 8, 0), "seeds differ");
    assert_ne!(a, (0..1000).collect::<Vec<_>>());
    // Roughly uniform: position of element 0 over many epochs spreads over the range.
    let mut first_half = 0;
    for e in 0..400 {
        if shuffle(10, 3, e).iter().position(|&v| v == 0).unwrap() < 5 {
            first_half += 1;
        }
    }
    assert!((150..250).contains(&first_half), "{first_half}");
}
