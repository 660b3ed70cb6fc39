//! Reading a rank process's output line by line for its agent to relay,
//! whatever the rank writes: bytes that are not UTF-8 (what NCCL, CUDA or a
//! file name may print) and lines without end neither stop the reading nor
//! grow it without bound, so the rank never blocks on a pipe its agent gave
//! up on, and its last lines (its error) still arrive.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The longest line handed over whole; a longer one is handed over in
/// pieces of this many bytes.
pub const MAX_RELAYED_LINE: usize = 64 * 1024;

/// Reads `output` until its end (or a read error), handing each line to
/// `on_line` without its line break, decoded lossily (a byte that is not
/// UTF-8 becomes U+FFFD).
pub async fn relay_lines<R: AsyncRead + Unpin>(output: R, mut on_line: impl FnMut(&str)) {
    let mut output = BufReader::new(output);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buffered = match output.fill_buf().await {
            Ok(buffered) => buffered,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buffered.is_empty() {
            break;
        }
        let room = MAX_RELAYED_LINE - line.len();
        let (used, ended) = match buffered.iter().position(|&b| b == b'\n') {
            Some(newline) if newline <= room => (newline + 1, true),
            _ => (buffered.len().min(room), false),
        };
        line.extend_from_slice(&buffered[..used]);
        output.consume(used);
        if ended || line.len() >= MAX_RELAYED_LINE {
            hand_over(&mut line, &mut on_line);
        }
    }
    if !line.is_empty() {
        hand_over(&mut line, &mut on_line);
    }
}

/// Hands `line` (its line break cut) to `on_line` and empties it.
fn hand_over(line: &mut Vec<u8>, on_line: &mut impl FnMut(&str)) {
    let text = String::from_utf8_lossy(line);
    on_line(text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text));
    line.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(output: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        relay_lines(output, |line| lines.push(line.to_string())).await;
        lines
    }

    #[tokio::test]
    async fn bytes_that_are_not_utf8_do_not_stop_the_lines_after_them() {
        let lines = lines_of(b"first \xff\xfe line\r\nerror: boom\nlast, unended").await;
        assert_eq!(lines, ["first \u{FFFD}\u{FFFD} line", "error: boom", "last, unended"]);
    }

    #[tokio::test]
    async fn a_line_without_end_is_handed_over_in_pieces_of_bounded_length() {
        let mut output = vec![b'x'; 2 * MAX_RELAYED_LINE + 10];
        output.extend_from_slice(b"\nnext\n");
        let lines = lines_of(&output).await;
        let lengths: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lengths, [MAX_RELAYED_LINE, MAX_RELAYED_LINE, 10, 4], "{:?}", &lines[3..]);
        assert_eq!(lines[3], "next");
    }
}
