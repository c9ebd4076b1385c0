//! How a fuzz input becomes a byte stream and the reads it arrives in.
//!
//! Layout: one header byte, then `k` cut offsets (3 bytes each, little endian), then the
//! payload. Header bits:
//!
//! - `0..=2`: `k`, the number of cut offsets (0 to 7). Each is taken modulo the payload length
//!   plus one; equal offsets collapse, so fewer reads than `k + 1` are possible.
//! - `3`: also deliver the payload one byte per read (payloads up to [`BYTEWISE_MAX`] only).
//! - `4`: expand `\xFE c b` in the payload to `(c + 1) * 512` copies of `b`, so a small input
//!   can reach the 16 KiB and 64 KiB limits (the `request` target only).
//!
//! A seed is therefore `\x00` followed by the bytes a client (or server) sends.

/// Longer payloads are not also run one byte per read: it would dominate the run time.
pub const BYTEWISE_MAX: usize = 1024;
/// Expansion stops here: past the largest limit (64 KiB) with room for a command after it.
const EXPANDED_MAX: usize = 80 * 1024;
const EXPAND_ESCAPE: u8 = 0xfe;
const EXPAND_UNIT: usize = 512;

pub struct Plan {
    pub payload: Vec<u8>,
    /// Sorted, distinct, each within `0..=payload.len()`.
    pub cuts: Vec<usize>,
    pub bytewise: bool,
}

impl Plan {
    pub fn decode(input: &[u8], allow_expand: bool) -> Option<Plan> {
        let (&header, rest) = input.split_first()?;
        let k = usize::from(header & 7);
        let bytewise = header & 8 != 0;
        let expand = allow_expand && header & 16 != 0;
        if rest.len() < 3 * k {
            return None;
        }
        let (raw_cuts, raw) = rest.split_at(3 * k);
        let payload = if expand { expanded(raw) } else { raw.to_vec() };
        let mut cuts: Vec<usize> = raw_cuts
            .chunks_exact(3)
            .map(|c| {
                let v = usize::from(c[0]) | usize::from(c[1]) << 8 | usize::from(c[2]) << 16;
                v % (payload.len() + 1)
            })
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        Some(Plan {
            bytewise: bytewise && payload.len() <= BYTEWISE_MAX,
            payload,
            cuts,
        })
    }

    /// The payload as the reads the cut offsets describe.
    pub fn reads(&self) -> Vec<&[u8]> {
        let mut out = Vec::with_capacity(self.cuts.len() + 1);
        let mut from = 0;
        for &cut in self.cuts.iter().chain(std::iter::once(&self.payload.len())) {
            out.push(&self.payload[from..cut]);
            from = cut;
        }
        out
    }

    /// The payload one byte per read.
    pub fn bytes(&self) -> Vec<&[u8]> {
        self.payload.chunks(1).collect()
    }
}

fn expanded(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i..] {
            [EXPAND_ESCAPE, count, byte, ..] => {
                let room = EXPANDED_MAX.saturating_sub(out.len());
                let len = ((usize::from(count) + 1) * EXPAND_UNIT).min(room);
                out.resize(out.len() + len, byte);
                i += 3;
            }
            _ => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    out
}
