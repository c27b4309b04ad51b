//! Minimal protobuf reader for SentencePiece's `ModelProto`.
//!
//! Only the wire format is implemented (varints, fixed32/64, length-delimited fields); unknown
//! fields are skipped. Every length and offset comes from an untrusted file, so every read is
//! checked and errors carry the absolute byte offset where the problem was found.

use super::TokenizerError;

/// Wire types of the protobuf encoding.
const WT_VARINT: u8 = 0;
const WT_FIXED64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_FIXED32: u8 = 5;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Absolute offset of `buf[0]` in the file, so nested messages report file offsets.
    base: usize,
}

pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8], usize),
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn truncated(&self, what: &'static str) -> TokenizerError {
        TokenizerError::Truncated {
            offset: self.offset(),
            what,
        }
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, TokenizerError> {
        let start = self.offset();
        let mut value: u64 = 0;
        // A u64 varint has at most 10 bytes; more means a corrupt file, not a big number.
        for i in 0..10u32 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.truncated(what));
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(TokenizerError::Malformed {
            offset: start,
            what: format!("{what}: varint longer than 10 bytes"),
        })
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TokenizerError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| self.truncated(what))?;
        let Some(slice) = self.buf.get(self.pos..end) else {
            return Err(self.truncated(what));
        };
        self.pos = end;
        Ok(slice)
    }

    /// Next `(field number, value)`, or `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, TokenizerError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key_offset = self.offset();
        let key = self.varint("field key")?;
        let field = key >> 3;
        let wire = (key & 7) as u8;
        if field == 0 {
            return Err(TokenizerError::Malformed {
                offset: key_offset,
                what: "field number 0".into(),
            });
        }
        let value = match wire {
            WT_VARINT => Value::Varint(self.varint("varint field")?),
            WT_FIXED64 => {
                self.take(8, "fixed64 field")?;
                Value::Fixed64
            }
            WT_LEN => {
                let len_offset = self.offset();
                let len = self.varint("length")?;
                let len = usize::try_from(len).map_err(|_| TokenizerError::Truncated {
                    offset: len_offset,
                    what: "length-delimited field",
                })?;
                let start = self.offset();
                Value::Bytes(self.take(len, "length-delimited field")?, start)
            }
            WT_FIXED32 => {
                let b = self.take(4, "fixed32 field")?;
                let mut a = [0u8; 4];
                a.copy_from_slice(b);
                Value::Fixed32(u32::from_le_bytes(a))
            }
            _ => {
                // Groups (3, 4) are deprecated and never written by SentencePiece; 6, 7 do not exist.
                return Err(TokenizerError::Malformed {
                    offset: key_offset,
                    what: format!("field {field}: unsupported wire type {wire}"),
                });
            }
        };
        Ok(Some((field, value)))
    }
}
