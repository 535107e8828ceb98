//! Ack ids: `SUBSCRIPTION-SEQUENCE-DELIVERY-CHECK`, naming one delivery (not the message), so
//! that an ack for a delivery that was since redelivered is told apart as `STALE`.
//!
//! The check (a hash of the other three) tells an id the broker issued, however long ago, from
//! one a client made up or mangled: the first is `STALE` once settled, the second `UNKNOWN`.

/// For the fuzz target: parses arbitrary text as an ack id, and checks that every id the
/// broker issues parses back to itself.
#[cfg(fuzzing)]
pub fn fuzz_ack_id(text: &str, subscription: u32, seq: u64, delivery: u64) {
    let _ = parse_ack_id(text);
    let issued = format_ack_id(subscription, seq, delivery);
    assert_eq!(parse_ack_id(&issued), Some((subscription, seq, delivery)));
}

/// The ack id of delivery number `delivery` of message `seq`.
pub(super) fn format_ack_id(subscription: u32, seq: u64, delivery: u64) -> String {
    let check = ack_check(subscription, seq, delivery);
    format!("{subscription}-{seq}-{delivery}-{check:08x}")
}

/// Reads an ack id back: `None` if this code did not make it.
pub(super) fn parse_ack_id(ack_id: &str) -> Option<(u32, u64, u64)> {
    let mut parts = ack_id.splitn(4, '-');
    let subscription = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let delivery = parts.next()?.parse().ok()?;
    let check = parts.next()?;
    (check.len() == 8
        && u32::from_str_radix(check, 16).ok()? == ack_check(subscription, seq, delivery))
    .then_some((subscription, seq, delivery))
}

/// The subscription an ack id names, without checking the rest: enough to route it to the
/// dispatcher that checks it.
pub(crate) fn subscription_of(ack_id: &str) -> Option<u32> {
    ack_id.split_once('-')?.0.parse().ok()
}

/// 32 bits of a SplitMix64-style mix of the id's parts: not a secret (ack ids are not
/// credentials), only a check that the id was made by this code.
fn ack_check(subscription: u32, seq: u64, delivery: u64) -> u32 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    (mix(mix(mix(u64::from(subscription)) ^ seq) ^ delivery) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_ids_round_trip_and_made_up_ones_are_refused() {
        let id = format_ack_id(7, 42, 1_700_000_000_000_123);
        assert_eq!(parse_ack_id(&id), Some((7, 42, 1_700_000_000_000_123)));
        for bad in [
            "7-42-1700000000000123",
            "7-42-1700000000000123-00000000",
            "8-42-1700000000000123-".to_owned().as_str(),
            "",
            "x-y-z-w",
        ] {
            assert_eq!(parse_ack_id(bad), None, "{bad}");
        }
        let forged = id.replacen("7-42", "7-43", 1);
        assert_eq!(parse_ack_id(&forged), None);
    }
}
