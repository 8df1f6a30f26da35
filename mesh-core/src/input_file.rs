//! Reading a local input file (workload state, manifests, tokens) that someone else may have
//! put there: only a regular file is read, never a FIFO, device or socket (a FIFO would block
//! the reader forever, `/dev/zero` would never end), and never more than a stated size, so a
//! bad file is an error that names it instead of a stuck thread or an exhausted heap.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The largest manifest file the controller and the node agents read from a manifest directory
/// (both read the same files; a bigger one, or `/dev/zero` behind a link, is an error).
pub const MANIFEST_MAX_BYTES: u64 = 16 << 20;

/// Why an input file was not read.
#[derive(Debug, thiserror::Error)]
pub enum InputFileError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a regular file ({kind}); point the setting at a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: larger than {limit} bytes; split it or raise the limit")]
    TooLarge { path: String, limit: u64 },
    #[error("{path}: not UTF-8 text: {source}")]
    NotText {
        path: String,
        source: std::string::FromUtf8Error,
    },
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Reads `path` as UTF-8 text if it is a regular file of at most `limit` bytes. The file is
/// opened non-blocking, so a FIFO at the path is refused instead of waiting for a writer.
pub fn read_text(path: &Path, limit: u64) -> Result<String, InputFileError> {
    let shown = || path.display().to_string();
    let io = |source| InputFileError::Io { path: shown(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(InputFileError::NotRegular {
            path: shown(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.len() > limit {
        return Err(InputFileError::TooLarge { path: shown(), limit });
    }
    // The file may grow between the stat and the read: read one byte past the limit to know.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(InputFileError::TooLarge { path: shown(), limit });
    }
    String::from_utf8(bytes).map_err(|source| InputFileError::NotText { path: shown(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.yaml");
        std::fs::write(&p, "workloads: []\n").unwrap();
        assert_eq!(read_text(&p, 100).unwrap(), "workloads: []\n");
    }

    #[test]
    fn refuses_what_is_not_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 101]).unwrap();
        let e = read_text(&big, 100).unwrap_err();
        assert!(matches!(e, InputFileError::TooLarge { limit: 100, .. }), "{e}");
        assert!(e.to_string().contains("big"), "the error names the file: {e}");

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_text(&fifo, 100).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");

        let e = read_text(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_text(dir.path(), 100).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");

        let bin = dir.path().join("bin");
        std::fs::write(&bin, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&bin, 100), Err(InputFileError::NotText { .. })));
    }
}
