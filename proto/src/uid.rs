//! The 16-byte agent instance identifier.

use std::fmt;

/// An agent's `instance_uid`: exactly 16 bytes since OpAMP v0.10 (a UUIDv7 is
/// recommended). Kept as a fixed array so that maps keyed by it cost no
/// allocation per agent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceUid([u8; 16]);

/// Why bytes or text are not an instance uid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceUidError {
    /// The uid is not 16 bytes long. Pre-v0.10 clients send a 26-character ULID.
    #[error("instance_uid must be 16 bytes, got {0}")]
    WrongLength(usize),
    /// The text is neither a UUID nor 32 hex digits.
    #[error("instance_uid text is not a UUID or 32 hex digits: {0:?}")]
    BadText(String),
}

impl InstanceUid {
    /// Wraps 16 raw bytes.
    pub const fn from_array(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Checks the length of a uid taken from the wire.
    ///
    /// ```
    /// # use fleetplane_proto::InstanceUid;
    /// assert!(InstanceUid::from_slice(&[7; 16]).is_ok());
    /// assert!(InstanceUid::from_slice(b"01ARZ3NDEKTSV4RRFFQ69G5FAV").is_err());
    /// ```
    pub fn from_slice(bytes: &[u8]) -> Result<Self, InstanceUidError> {
        <[u8; 16]>::try_from(bytes)
            .map(Self)
            .map_err(|_| InstanceUidError::WrongLength(bytes.len()))
    }

    /// A fresh UUIDv7, as the spec recommends for server-assigned uids.
    pub fn new_v7() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    /// The raw bytes, as they go on the wire.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The bytes as an owned vector, for prost fields.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// Parses the canonical UUID form (as in the `OpAMP-Instance-UID` header)
    /// or 32 plain hex digits (as the admin API prints them).
    ///
    /// ```
    /// # use fleetplane_proto::InstanceUid;
    /// let uid = InstanceUid::parse("0192f2a4-7b1c-7d3e-8f00-0123456789ab").unwrap();
    /// assert_eq!(uid, InstanceUid::parse("0192f2a47b1c7d3e8f000123456789ab").unwrap());
    /// assert_eq!(uid.to_string(), "0192f2a47b1c7d3e8f000123456789ab");
    /// ```
    pub fn parse(text: &str) -> Result<Self, InstanceUidError> {
        let digits: String = text.chars().filter(|c| *c != '-').collect();
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(&digits, &mut bytes).map_err(|_| InstanceUidError::BadText(text.to_owned()))?;
        Ok(Self(bytes))
    }

    /// The canonical hyphenated UUID text, for the `OpAMP-Instance-UID` header.
    pub fn to_uuid_string(&self) -> String {
        uuid::Uuid::from_bytes(self.0).hyphenated().to_string()
    }
}

/// Plain lowercase hex: compact, and what the admin API uses in paths.
impl fmt::Display for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        // Cannot fail: the buffer is exactly twice the input length.
        let _ = hex::encode_to_slice(self.0, &mut buf);
        f.write_str(std::str::from_utf8(&buf).unwrap_or_default())
    }
}

impl fmt::Debug for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceUid({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_lengths() {
        assert_eq!(
            InstanceUid::from_slice(&[1; 15]),
            Err(InstanceUidError::WrongLength(15))
        );
        assert_eq!(InstanceUid::from_slice(&[]), Err(InstanceUidError::WrongLength(0)));
    }

    #[test]
    fn text_round_trip() {
        let uid = InstanceUid::new_v7();
        assert_eq!(InstanceUid::parse(&uid.to_string()), Ok(uid));
        assert_eq!(InstanceUid::parse(&uid.to_uuid_string()), Ok(uid));
        assert!(InstanceUid::parse("not-a-uid").is_err());
        assert!(InstanceUid::parse("abcd").is_err());
    }

    #[test]
    fn v7_uids_differ() {
        assert_ne!(InstanceUid::new_v7(), InstanceUid::new_v7());
    }
}
