//! Where `taskq map`'s inputs come from: the lines (or NUL-separated
//! items) of stdin or of files, or whole files, each with its position for
//! messages (`line 17`, `a.txt:17`, `a.txt`).
//!
//! Splitting follows `xargs -d '\n'` (or `xargs -0`): the delimiter is
//! removed and nothing else (no trimming, a `\r` stays); an empty line
//! between others is an empty input; a final delimiter does not make an
//! empty input after it. Files are read one after the other, numbered
//! from 1 each, and a file's last line needs no newline.
//!
//! Inputs are read on a thread of their own, ahead of the puts by at most
//! the channel's capacity, so memory does not grow with the input.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// How the input is cut into inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Split {
    /// One input per line.
    Lines,
    /// One input per NUL-terminated item (`-0`).
    Nul,
    /// Each file whole is one input (`--file-per-task`).
    WholeFiles,
}

impl Split {
    fn delimiter(self) -> Option<u8> {
        match self {
            Self::Lines => Some(b'\n'),
            Self::Nul => Some(0),
            Self::WholeFiles => None,
        }
    }
}

/// Where inputs are read from: stdin or a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Standard input (no file given, or `-`).
    Stdin,
    /// A file, named as it was given.
    File(Arc<str>),
}

impl Origin {
    /// `-` is stdin, as for most Unix tools; anything else a file.
    pub(crate) fn of(path: &std::path::Path) -> Self {
        if path.as_os_str() == "-" {
            Self::Stdin
        } else {
            Self::File(path.display().to_string().into())
        }
    }

    fn open(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Self::Stdin => Box::new(std::io::stdin()),
            Self::File(path) => Box::new(std::fs::File::open(PathBuf::from(&**path))?),
        })
    }
}

/// Where an input came from, for messages and `--json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    origin: Origin,
    /// The line's (or item's) number in its file or stdin, from 1; `None`
    /// for a whole file, or a file that could not be read.
    number: Option<u64>,
    split: Split,
}

impl Position {
    /// A position, for tests elsewhere.
    #[cfg(test)]
    pub(crate) fn new(origin: Origin, number: Option<u64>, split: Split) -> Self {
        Self {
            origin,
            number,
            split,
        }
    }

    /// The number of the line or item, from 1.
    pub(crate) fn number(&self) -> Option<u64> {
        self.number
    }

    /// The file, when the input came from one.
    pub(crate) fn file(&self) -> Option<&str> {
        match &self.origin {
            Origin::Stdin => None,
            Origin::File(path) => Some(path),
        }
    }
}

impl fmt::Display for Position {
    /// `line 17` (stdin), `item 17` (stdin with `-0`), `a.txt:17` (a
    /// file), `a.txt` or `stdin` (a whole input).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.origin, self.number) {
            (Origin::Stdin, Some(n)) if self.split == Split::Nul => write!(f, "item {n}"),
            (Origin::Stdin, Some(n)) => write!(f, "line {n}"),
            (Origin::File(path), Some(n)) => write!(f, "{path}:{n}"),
            (Origin::Stdin, None) => f.write_str("stdin"),
            (Origin::File(path), None) => f.write_str(path),
        }
    }
}

/// One input as read: its payload, or why it could not be read.
#[derive(Debug)]
pub(crate) struct Input {
    /// Where it came from.
    pub(crate) position: Position,
    /// The bytes to put as the task's payload, or the read error.
    pub(crate) payload: Result<Bytes, String>,
}

/// Starts reading `origins` in order on a thread of its own; the inputs
/// come out of the returned channel, which closes after the last.
///
/// The thread is not joined: a read of stdin cannot be interrupted, so a
/// run that stops early leaves it blocked until the process exits. It
/// stops by itself at the end of the input or when the receiver is gone.
pub(crate) fn read(origins: Vec<Origin>, split: Split, ahead: usize) -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(ahead.max(1));
    let reader = move || {
        for origin in origins {
            if !read_origin(&origin, split, &tx) {
                return;
            }
        }
    };
    if let Err(error) = std::thread::Builder::new()
        .name("taskq-map-input".into())
        .spawn(reader)
    {
        // Without a reader the channel is closed at once: no inputs, and
        // the run says why.
        tracing::error!(%error, "cannot start the input reader");
    }
    rx
}

/// Reads one origin into `tx`; `false` once the receiver is gone.
fn read_origin(origin: &Origin, split: Split, tx: &mpsc::Sender<Input>) -> bool {
    let send = |number: Option<u64>, payload: Result<Bytes, String>| {
        let position = Position {
            origin: origin.clone(),
            number,
            split,
        };
        tx.blocking_send(Input { position, payload }).is_ok()
    };
    let mut source = match origin.open() {
        Ok(source) => source,
        Err(error) => return send(None, Err(error.to_string())),
    };
    let Some(delimiter) = split.delimiter() else {
        let mut whole = Vec::new();
        return match source.read_to_end(&mut whole) {
            Ok(_) => send(None, Ok(Bytes::from(whole))),
            Err(error) => send(None, Err(error.to_string())),
        };
    };
    let mut number = 0;
    let outcome = split_records(
        BufReader::with_capacity(64 * 1024, source),
        delimiter,
        |record| {
            number += 1;
            send(Some(number), Ok(Bytes::from(record)))
        },
    );
    match outcome {
        Ok(more) => more,
        // The records before the error went out; the error says where the
        // file stopped being read.
        Err(error) => send(None, Err(format!("after record {number}: {error}"))),
    }
}

/// Calls `each` with every record of `reader`, without its delimiter,
/// until the end or until `each` returns `false`. Returns whether `each`
/// wants more.
fn split_records(
    mut reader: impl BufRead,
    delimiter: u8,
    mut each: impl FnMut(Vec<u8>) -> bool,
) -> std::io::Result<bool> {
    loop {
        let mut record = Vec::new();
        if reader.read_until(delimiter, &mut record)? == 0 {
            return Ok(true);
        }
        if record.last() == Some(&delimiter) {
            record.pop();
        }
        if !each(record) {
            return Ok(false);
        }
    }
}

/// Counts the inputs of `origins` on a thread of its own, for the progress
/// line's total; the answer comes on the returned channel, or never when
/// a file cannot be read or stdin is among them (stdin can be read only
/// once: the run then learns the total at the end of its input).
pub(crate) fn count(origins: Vec<Origin>, split: Split) -> oneshot::Receiver<u64> {
    let (tx, rx) = oneshot::channel();
    if origins.contains(&Origin::Stdin) {
        return rx;
    }
    let counter = move || {
        let mut total = 0;
        for origin in &origins {
            let Some(delimiter) = split.delimiter() else {
                total += 1;
                continue;
            };
            match origin.open() {
                Ok(source) => match count_records(source, delimiter) {
                    Ok(n) => total += n,
                    Err(_) => return,
                },
                Err(_) => return,
            }
        }
        let _ = tx.send(total);
    };
    if let Err(error) = std::thread::Builder::new()
        .name("taskq-map-count".into())
        .spawn(counter)
    {
        tracing::debug!(%error, "cannot count the inputs; the progress line waits for the end");
    }
    rx
}

/// The number of records [`split_records`] finds in `reader`, without
/// keeping them.
fn count_records(mut reader: impl Read, delimiter: u8) -> std::io::Result<u64> {
    let mut buffer = vec![0; 64 * 1024];
    let (mut records, mut last) = (0, delimiter);
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        records += buffer[..n].iter().filter(|b| **b == delimiter).count() as u64;
        last = buffer[n - 1];
    }
    // Data after the last delimiter is one more record.
    Ok(records + u64::from(last != delimiter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(text: &[u8], delimiter: u8) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        split_records(text, delimiter, |r| {
            all.push(r);
            true
        })
        .unwrap();
        all
    }

    #[test]
    fn lines_split_like_xargs_with_a_newline_delimiter() {
        let cases: [(&[u8], &[&[u8]]); 7] = [
            (b"", &[]),
            (b"\n", &[b""]),
            (b"a\nb\n", &[b"a", b"b"]),
            (b"a\nb", &[b"a", b"b"]),
            (b"a\n\nb\n", &[b"a", b"", b"b"]),
            (b" a \r\n", &[b" a \r"]),
            (b"a\n\n", &[b"a", b""]),
        ];
        for (text, expected) in cases {
            assert_eq!(records(text, b'\n'), expected, "{text:?}");
            let counted = count_records(text, b'\n').unwrap();
            assert_eq!(counted, expected.len() as u64, "{text:?}");
        }
        assert_eq!(records(b"a b\0c\nd\0", 0), [&b"a b"[..], b"c\nd"]);
        assert_eq!(count_records(&b"a b\0c\nd\0"[..], 0).unwrap(), 2);
    }

    #[test]
    fn the_reader_stops_when_told() {
        let mut seen = 0;
        let more = split_records(&b"a\nb\nc\n"[..], b'\n', |_| {
            seen += 1;
            seen < 2
        })
        .unwrap();
        assert_eq!((more, seen), (false, 2));
    }

    #[test]
    fn positions_name_the_line_the_item_or_the_file() {
        let at = |origin: Origin, number, split| {
            Position {
                origin,
                number,
                split,
            }
            .to_string()
        };
        let file = || Origin::File("a.txt".into());
        assert_eq!(at(Origin::Stdin, Some(17), Split::Lines), "line 17");
        assert_eq!(at(Origin::Stdin, Some(17), Split::Nul), "item 17");
        assert_eq!(at(file(), Some(17), Split::Lines), "a.txt:17");
        assert_eq!(at(file(), None, Split::WholeFiles), "a.txt");
        assert_eq!(at(Origin::Stdin, None, Split::WholeFiles), "stdin");
        assert_eq!(Origin::of(std::path::Path::new("-")), Origin::Stdin);
    }

    #[tokio::test]
    async fn files_are_read_in_order_numbered_each_from_1() {
        let dir = std::env::temp_dir().join(format!("taskq-map-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"1\n2").unwrap();
        std::fs::write(&b, b"3\n").unwrap();
        let missing = dir.join("missing");
        let origins: Vec<Origin> = [&a, &missing, &b].map(|p| Origin::of(p)).into();
        let mut inputs = read(origins.clone(), Split::Lines, 1);
        let mut seen = Vec::new();
        while let Some(input) = inputs.recv().await {
            let payload = input
                .payload
                .map(|p| String::from_utf8(p.to_vec()).unwrap());
            seen.push((
                input.position.file().map(str::to_string),
                input.position.number(),
                payload,
            ));
        }
        let name = |p: &PathBuf| Some(p.display().to_string());
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen[0], (name(&a), Some(1), Ok("1".into())));
        assert_eq!(seen[1], (name(&a), Some(2), Ok("2".into())));
        assert_eq!(
            (&seen[2].0, seen[2].1, seen[2].2.is_err()),
            (&name(&missing), None, true)
        );
        assert_eq!(seen[3], (name(&b), Some(1), Ok("3".into())));
        // The count needs every file: one missing, no total.
        assert!(count(origins, Split::Lines).await.is_err());
        assert_eq!(
            count(vec![Origin::of(&a), Origin::of(&b)], Split::Lines).await,
            Ok(3)
        );
        assert_eq!(
            count(vec![Origin::of(&a), Origin::of(&b)], Split::WholeFiles).await,
            Ok(2)
        );

        let mut whole = read(vec![Origin::of(&a)], Split::WholeFiles, 1);
        let input = whole.recv().await.unwrap();
        assert_eq!(
            (input.position.to_string(), input.payload),
            (a.display().to_string(), Ok(Bytes::from_static(b"1\n2")))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
