//! Redis Cluster key slots: CRC16 (XMODEM) of the key's hash tag, modulo 16384.

/// The cluster slot of `key`, following Redis' hash-tag rule: if the key holds a `{...}` with at
/// least one character inside, only that part is hashed.
pub(crate) fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % 16_384
}

fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots as a Redis server reports them (`CLUSTER KEYSLOT`, Redis 7), which the grouping of
    /// limits into one call per slot must match.
    const KNOWN: [(&str, u16); 15] = [
        ("123456789", 12_739),
        ("foo", 12_182),
        ("", 0),
        // A hash tag: only the part inside the first `{...}` is hashed.
        ("{user1000}.following", 3_443),
        ("{user1000}.followers", 3_443),
        ("user1000", 3_443),
        ("foo{bar}{zap}", 5_061),
        ("bar", 5_061),
        // An empty tag, or none closed, hashes the whole key.
        ("foo{}{bar}", 8_363),
        ("{}", 15_257),
        ("foo{bar", 15_278),
        // The tag ends at the first `}` after the first `{`.
        ("foo{{bar}}zap", 4_015),
        ("{bar", 4_015),
        // Keys as the store writes them.
        ("tollgate:{user:alice}:tier", 4_489),
        ("tollgate:global", 242),
    ];

    #[test]
    fn known_slots() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        for (key, slot_number) in KNOWN {
            assert_eq!(slot(key.as_bytes()), slot_number, "slot of {key:?}");
        }
    }
}
