//! The key of an instance's single-writer lock.
//!
//! [`instance_lock_key`] is the 64-bit key [`crate::PgStore`] passes to
//! `pg_advisory_xact_lock(bigint)`: the first 8 bytes (big-endian, as a signed integer)
//! of SHA-256 over
//!
//! ```text
//! "hephaestus.instance" 0x00 <schema prefix> 0x00 <the instance id's 16 bytes>
//! ```
//!
//! - 64 bits: two instances share a key with probability 2^-64 (the original's 27-bit
//!   `phash2` made unrelated instances wait for each other, G23).
//! - Namespaced: the constant and the prefix are hashed in, so two schemas (tenants) on
//!   one database never share a key, and another application's advisory locks collide
//!   with ours only by chance at 2^-64 per key.
//! - Deterministic and specified: every process, version and platform computes the same
//!   key (no `std` hasher, whose algorithm may change between Rust releases).

use hephaestus_migrations_gen::SchemaPrefix;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The namespace hashed into every instance lock key.
pub const LOCK_NAMESPACE: &str = "hephaestus.instance";

/// The advisory lock key of instance `id` in schema `prefix` (see the module docs).
pub fn instance_lock_key(prefix: &SchemaPrefix, id: Uuid) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(LOCK_NAMESPACE.as_bytes());
    hasher.update([0]);
    hasher.update(prefix.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(id.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0_u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_namespaced() {
        let id = Uuid::from_u128(0x0193_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5b);
        let public = SchemaPrefix::default();
        let tenant = SchemaPrefix::new("tenant_a").unwrap();
        // A fixed vector: changing the derivation would let two versions of this crate
        // lock the same instance under different keys.
        let mut hasher = Sha256::new();
        hasher.update(b"hephaestus.instance\0public\0");
        hasher.update(id.as_bytes());
        let digest = hasher.finalize();
        let expected = i64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(instance_lock_key(&public, id), expected);
        assert_eq!(
            instance_lock_key(&public, id),
            instance_lock_key(&public, id)
        );
        assert_ne!(
            instance_lock_key(&public, id),
            instance_lock_key(&tenant, id)
        );
        assert_ne!(
            instance_lock_key(&public, id),
            instance_lock_key(&public, Uuid::from_u128(1))
        );
    }
}
