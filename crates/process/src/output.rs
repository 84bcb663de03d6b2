//! Reading a child's output without trusting its size.

use std::io::BufRead;

/// The next line of `reader` without its line end, keeping at most `limit` bytes of it (the
/// rest is read and dropped, and the line says it was cut); `None` at the end.
pub fn read_line_capped(
    reader: &mut impl BufRead,
    limit: usize,
) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut cut = false;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            break;
        }
        read_any = true;
        let end = available.iter().position(|byte| *byte == b'\n');
        let part = &available[..end.unwrap_or(available.len())];
        let room = limit.saturating_sub(line.len());
        cut |= part.len() > room;
        line.extend_from_slice(&part[..part.len().min(room)]);
        let consumed = end.map_or(available.len(), |end| end + 1);
        reader.consume(consumed);
        if end.is_some() {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let mut text = String::from_utf8_lossy(&line).into_owned();
    if cut {
        text.push_str(" [line cut]");
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_and_said_so_and_short_ones_pass() {
        let input = format!("short\r\n{}\nlast", "x".repeat(10_000));
        let mut reader = std::io::BufReader::with_capacity(64, input.as_bytes());
        assert_eq!(
            read_line_capped(&mut reader, 100).unwrap().unwrap(),
            "short"
        );
        let long = read_line_capped(&mut reader, 100).unwrap().unwrap();
        assert_eq!(long, format!("{} [line cut]", "x".repeat(100)));
        assert_eq!(read_line_capped(&mut reader, 100).unwrap().unwrap(), "last");
        assert_eq!(read_line_capped(&mut reader, 100).unwrap(), None);
    }
}
