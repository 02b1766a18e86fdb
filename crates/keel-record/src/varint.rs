//! Zigzag LEB128 varints, as in Kafka's record format: small magnitudes take one byte.

use crate::DecodeError;

/// Largest encoding of a 64-bit varint in bytes.
pub const VARLONG_BYTES_MAX: usize = 10;

/// Appends `v` zigzag-encoded.
pub fn put_varlong(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Number of bytes `put_varlong(v)` writes.
pub fn varlong_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    let bits = 64 - (z | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads one zigzag varint from `buf` at `*pos`, advancing `*pos`.
pub fn get_varlong(buf: &[u8], pos: &mut usize) -> Result<i64, DecodeError> {
    let mut z: u64 = 0;
    for i in 0..VARLONG_BYTES_MAX {
        let Some(&b) = buf.get(*pos) else {
            return Err(DecodeError::Malformed("varint runs past the end of the batch"));
        };
        *pos += 1;
        // The tenth byte may only carry the top bit of a u64.
        if i == VARLONG_BYTES_MAX - 1 && b > 1 {
            return Err(DecodeError::Malformed("varint overflows 64 bits"));
        }
        z |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err(DecodeError::Malformed("varint longer than 10 bytes"))
}

/// Reads a varint that must fit an i32.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<i32, DecodeError> {
    let v = get_varlong(buf, pos)?;
    i32::try_from(v).map_err(|_| DecodeError::Malformed("varint out of i32 range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_table() {
        for v in [0i64, 1, -1, 63, -64, 64, 300, -300, i32::MAX as i64, i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            assert_eq!(out.len(), varlong_len(v), "length of {v}");
            let mut pos = 0;
            assert_eq!(get_varlong(&out, &mut pos).unwrap(), v);
            assert_eq!(pos, out.len());
        }
    }

    #[test]
    fn overlong_is_an_error() {
        let buf = [0xffu8; 11];
        assert!(get_varlong(&buf, &mut 0).is_err());
        let buf = [0x80u8, 0x80];
        assert!(get_varlong(&buf, &mut 0).is_err());
    }
}
