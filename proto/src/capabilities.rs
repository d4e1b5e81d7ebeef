//! Capability and flag bit sets.
//!
//! On the wire these are plain `uint64` fields; the generated enums only name the
//! bits. These wrappers make tests like "may we offer remote config?" read as
//! what they mean, and keep unknown bits intact (a receiver must ignore bits it
//! does not know, not drop them).

use crate::opamp::{AgentCapabilities, AgentToServerFlags, ServerCapabilities, ServerToAgentFlags};

macro_rules! bitset {
    ($(#[$doc:meta])* $name:ident, $bit:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// Whether `bit` is set.
            pub fn has(self, bit: $bit) -> bool {
                self.0 & bit as u64 != 0
            }

            /// This set with `bit` added.
            #[must_use]
            pub fn with(self, bit: $bit) -> Self {
                Self(self.0 | bit as u64)
            }

            /// The set built from a list of bits.
            pub fn of(bits: &[$bit]) -> Self {
                bits.iter().fold(Self(0), |set, bit| set.with(*bit))
            }

            /// The raw value for the wire.
            pub fn bits(self) -> u64 {
                self.0
            }
        }
    };
}

bitset!(
    /// What an agent says it can do (`AgentToServer.capabilities`).
    AgentCaps,
    AgentCapabilities
);
bitset!(
    /// What the server says it can do (`ServerToAgent.capabilities`).
    ServerCaps,
    ServerCapabilities
);
bitset!(
    /// `AgentToServer.flags`.
    AgentFlags,
    AgentToServerFlags
);
bitset!(
    /// `ServerToAgent.flags`.
    ServerFlags,
    ServerToAgentFlags
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_the_spec() {
        assert_eq!(AgentCapabilities::ReportsStatus as u64, 0x1);
        assert_eq!(AgentCapabilities::AcceptsRemoteConfig as u64, 0x2);
        assert_eq!(AgentCapabilities::ReportsHealth as u64, 0x800);
        assert_eq!(AgentCapabilities::ReportsRemoteConfig as u64, 0x1000);
        assert_eq!(AgentCapabilities::ReportsHeartbeat as u64, 0x2000);
        assert_eq!(AgentCapabilities::ReportsConnectionSettingsStatus as u64, 0x8000);
        assert_eq!(ServerCapabilities::OffersConnectionSettings as u64, 0x20);
        assert_eq!(ServerCapabilities::AcceptsConnectionSettingsRequest as u64, 0x40);
        assert_eq!(ServerToAgentFlags::ReportFullState as u64, 0x1);
        assert_eq!(ServerToAgentFlags::ReportAvailableComponents as u64, 0x2);
        assert_eq!(AgentToServerFlags::RequestInstanceUid as u64, 0x1);
    }

    #[test]
    fn unknown_bits_survive() {
        let caps = AgentCaps(1 << 40).with(AgentCapabilities::ReportsStatus);
        assert!(caps.has(AgentCapabilities::ReportsStatus));
        assert!(!caps.has(AgentCapabilities::AcceptsRemoteConfig));
        assert_eq!(caps.bits(), (1 << 40) | 1);
    }
}
