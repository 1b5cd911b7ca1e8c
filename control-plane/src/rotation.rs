//! Secret rotation: which secrets a token keeps on record after a new one is issued.

use crate::store::{RetiredSecret, TokenRow};

/// Longest an old secret may keep working after a rotation.
pub const MAX_GRACE_SECONDS: u64 = 30 * 86_400;

/// Issues `new_hash` as the token's secret at `now`. The replaced secret stays honoured
/// until `now + grace` (with no grace, refused at once). A second rotation ends any earlier
/// grace: a secret still in its grace is kept once more as a tombstone (`until: now`), so
/// the filters learn that it is refused now rather than when its grace would have ended.
/// Older retired secrets are dropped, so a token holds at most one honoured old secret and
/// at most one tombstone, however many rotations come in the same second. The store makes
/// a filter that may have missed a dropped tombstone start over from a snapshot.
pub fn rotate(row: &mut TokenRow, new_hash: String, now: i64, grace: u64) {
    let mut retired: Vec<RetiredSecret> = row
        .retired
        .iter()
        .filter(|s| s.until > now)
        .map(|s| RetiredSecret {
            hash: s.hash.clone(),
            until: now,
        })
        .collect();
    retired.push(RetiredSecret {
        hash: std::mem::replace(&mut row.hash, new_hash),
        until: now.saturating_add(i64::try_from(grace).unwrap_or(i64::MAX)),
    });
    row.retired = retired;
    row.rotated_at = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Status;
    use tokengate_wire::Kind;

    fn row() -> TokenRow {
        TokenRow {
            id: "tok_a".into(),
            hash: "h0".into(),
            name: "n".into(),
            kind: Kind::User,
            owner: "o".into(),
            status: Status::Active,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            created_at: 0,
            updated_at: 0,
            expires_at: None,
            last_used_at: None,
            version: 1,
            requests_allowed: 0,
            requests_denied: 0,
            rotated_at: None,
            retired: vec![],
            scopes: None,
            quota: None,
        }
    }

    fn honoured(r: &TokenRow, now: i64) -> Vec<&str> {
        r.retired
            .iter()
            .filter(|s| s.until > now)
            .map(|s| s.hash.as_str())
            .collect()
    }

    #[test]
    fn many_rotations_in_one_second_keep_one_old_secret() {
        for grace in [0, 60] {
            let mut r = row();
            for i in 1..=200 {
                rotate(&mut r, format!("h{i}"), 1_000, grace);
                assert!(r.retired.len() <= 2, "grace {grace}: {:?}", r.retired);
            }
            assert_eq!(r.hash, "h200");
            let expected: Vec<&str> = if grace == 0 { vec![] } else { vec!["h199"] };
            assert_eq!(honoured(&r, 1_000), expected, "grace {grace}");
        }
    }

    #[test]
    fn a_second_rotation_cuts_the_first_grace_short() {
        let mut r = row();
        rotate(&mut r, "h1".into(), 1_000, 3_600);
        assert_eq!(
            r.retired,
            [RetiredSecret {
                hash: "h0".into(),
                until: 4_600
            }]
        );
        rotate(&mut r, "h2".into(), 1_010, 60);
        assert_eq!(
            r.retired,
            [
                RetiredSecret {
                    hash: "h0".into(),
                    until: 1_010
                },
                RetiredSecret {
                    hash: "h1".into(),
                    until: 1_070
                }
            ]
        );
        // Once a tombstone has travelled with one version it is dropped by the next rotation.
        rotate(&mut r, "h3".into(), 1_020, 0);
        let hashes: Vec<&str> = r.retired.iter().map(|s| s.hash.as_str()).collect();
        assert_eq!(hashes, ["h1", "h2"]);
        assert!(honoured(&r, 1_020).is_empty());
    }
}
