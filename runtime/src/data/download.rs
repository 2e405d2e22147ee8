//! Fetching the official CIFAR archives: download (the only network part, [`fetch`]), MD5
//! check and unpacking ([`verify_and_unpack`], usable offline on an archive already there).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use super::{DataError, DatasetKind};

/// An official archive: where it is published and its published MD5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Archive {
    pub url: &'static str,
    /// File name of the archive.
    pub file: &'static str,
    /// MD5 (lowercase hex) published with the archive.
    pub md5: &'static str,
    /// The folder the archive unpacks to.
    pub folder: &'static str,
}

pub const CIFAR10_BINARY: Archive = Archive {
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    file: "cifar-10-binary.tar.gz",
    md5: "c32a1d4ab5d03f1284b67883e8d87530",
    folder: "cifar-10-batches-bin",
};

pub const CIFAR100_BINARY: Archive = Archive {
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    file: "cifar-100-binary.tar.gz",
    md5: "03b5dce01913d631647c71ecec9e9cb8",
    folder: "cifar-100-binary",
};

/// Largest download accepted (both CIFAR archives are about 170 MB).
pub const MAX_DOWNLOAD: u64 = 1 << 30;

/// The official archive of `kind`, if it has one this module can fetch.
pub fn archive(kind: DatasetKind) -> Result<&'static Archive, DataError> {
    match kind {
        DatasetKind::Cifar10 => Ok(&CIFAR10_BINARY),
        DatasetKind::Cifar100 => Ok(&CIFAR100_BINARY),
        other => Err(DataError::Unsupported(format!(
            "no download for {}: get it yourself and give its folder (accepted layouts:\n{})",
            other.name(),
            super::layouts(other)
        ))),
    }
}

/// Downloads the official archive of `kind` into the folder `to` (unless a copy with the right
/// MD5 is already there), checks its MD5 and unpacks it there. Returns the unpacked folder,
/// which [`super::load`] accepts.
pub fn download(kind: DatasetKind, to: &Path) -> Result<PathBuf, DataError> {
    let a = archive(kind)?;
    std::fs::create_dir_all(to).map_err(|e| DataError::io(to, e))?;
    let dest = to.join(a.file);
    if !(dest.is_file() && md5_file(&dest)? == a.md5) {
        fetch(a.url, &dest)?;
    }
    verify_and_unpack(&dest, a.md5, to)?;
    let folder = to.join(a.folder);
    if !folder.is_dir() {
        return Err(DataError::invalid(
            &dest,
            format!("the archive did not unpack to {}", a.folder),
        ));
    }
    Ok(folder)
}

/// Downloads `url` to `dest`: written to `dest.part` first, renamed when complete.
pub fn fetch(url: &str, dest: &Path) -> Result<(), DataError> {
    let err = |message: String| DataError::Download {
        url: url.to_string(),
        message,
    };
    let resp = ureq::get(url).call().map_err(|e| err(e.to_string()))?;
    let mut reader = resp
        .into_body()
        .into_with_config()
        .limit(MAX_DOWNLOAD)
        .reader();
    let part = dest.with_extension("part");
    let mut file = std::fs::File::create(&part).map_err(|e| DataError::io(&part, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| err(e.to_string()))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .map_err(|e| DataError::io(&part, e))?;
    }
    file.sync_all().map_err(|e| DataError::io(&part, e))?;
    std::fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))
}

/// The MD5 of a file, lowercase hex.
pub fn md5_file(path: &Path) -> Result<String, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks that `archive` (a `.tar.gz`) has the MD5 `md5`, then unpacks it into `to`. Members
/// that would land outside `to` (absolute paths, `..`) are refused by the tar reader.
pub fn verify_and_unpack(archive: &Path, md5: &str, to: &Path) -> Result<(), DataError> {
    let actual = md5_file(archive)?;
    if !actual.eq_ignore_ascii_case(md5) {
        return Err(DataError::Checksum {
            path: archive.to_path_buf(),
            actual,
            expected: md5.to_ascii_lowercase(),
        });
    }
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    tar.unpack(to).map_err(|e| DataError::Corrupt {
        path: archive.to_path_buf(),
        offset: 0,
        message: format!("unpacking into {}: {e}", to.display()),
    })
}
