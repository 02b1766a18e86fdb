//! Which partition a record goes to. Keyed records follow the rule in keel.proto, so that every
//! client (in any language) puts one key in the same partition.

pub use keel_record::fnv1a_64;

/// The partition of a keyed record: `fnv1a_64(key) mod partition_count` (0 when `count` is 0).
pub fn partition_for_key(key: &[u8], count: u32) -> u32 {
    if count == 0 {
        return 0;
    }
    // The remainder is below `count`, so it fits in u32.
    (fnv1a_64(key) % u64::from(count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_64_matches_published_vectors() {
        // Vectors from the reference FNV test suite (isthe.com/chongo/tech/comp/fnv).
        let table: [(&[u8], u64); 5] = [
            (b"", 0xcbf29ce484222325),
            (b"a", 0xaf63dc4c8601ec8c),
            (b"b", 0xaf63df4c8601f1a5),
            (b"foo", 0xdcb27518fed9d577),
            (b"foobar", 0x85944171f73967e8),
        ];
        for (input, want) in table {
            assert_eq!(fnv1a_64(input), want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn keys_map_to_the_hash_modulo_the_count() {
        let table: [(&[u8], u32, u32); 5] = [
            (b"", 1, 0),
            (b"a", 3, (0xaf63dc4c8601ec8c_u64 % 3) as u32),
            (b"foo", 7, (0xdcb27518fed9d577_u64 % 7) as u32),
            (b"foobar", 16, 0x8),
            (b"x", 0, 0),
        ];
        for (key, count, want) in table {
            assert_eq!(partition_for_key(key, count), want, "{key:?} over {count}");
        }
        for count in 1..50 {
            assert!(partition_for_key(b"some key", count) < count);
        }
    }
}
