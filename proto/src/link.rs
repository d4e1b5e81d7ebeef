//! How an agent reaches its gateway: a WebSocket connection with its own
//! number, or plain-HTTP polls that belong to no connection.
//!
//! On the wire and in records a connection is a `u64` where `0` means "none";
//! in code it is a [`Link`], so "no connection" cannot be mistaken for a
//! connection, and a connection number can only come from [`ConnectionId::new`].

use std::{fmt, num::NonZeroU64};

use crate::internal::Transport;

/// One WebSocket connection on one gateway. Gateways number their
/// connections from 1, so a number is never 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(NonZeroU64);

impl ConnectionId {
    /// The first number a gateway gives out.
    pub const FIRST: Self = Self(NonZeroU64::MIN);

    /// A connection number as the wire carries it; `None` for 0 ("no connection").
    ///
    /// ```
    /// # use fleetplane_proto::ConnectionId;
    /// assert!(ConnectionId::new(0).is_none());
    /// assert_eq!(ConnectionId::new(7).unwrap().get(), 7);
    /// ```
    pub const fn new(value: u64) -> Option<Self> {
        match NonZeroU64::new(value) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }

    /// The number, as the wire and records carry it.
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The wire form of an optional connection: 0 for none.
    pub fn wire(connection: Option<Self>) -> u64 {
        connection.map_or(0, Self::get)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({})", self.0)
    }
}

/// How a message reached its gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// A plain-HTTP poll: answered on its own request, reachable by no push.
    Http,
    /// A message on this WebSocket connection.
    WebSocket(ConnectionId),
}

impl Link {
    /// The WebSocket connection, if any.
    pub const fn connection(self) -> Option<ConnectionId> {
        match self {
            Link::Http => None,
            Link::WebSocket(c) => Some(c),
        }
    }

    /// The transport, as records store it.
    pub const fn transport(self) -> Transport {
        match self {
            Link::Http => Transport::Http,
            Link::WebSocket(_) => Transport::Websocket,
        }
    }

    /// Reads the wire pair (transport, connection number). A WebSocket needs a
    /// connection number and plain HTTP must not have one: anything else is
    /// not a link this build ever sends.
    ///
    /// ```
    /// # use fleetplane_proto::{Link, ConnectionId, internal::Transport};
    /// assert_eq!(Link::from_wire(Transport::Http as i32, 0), Some(Link::Http));
    /// assert_eq!(Link::from_wire(Transport::Websocket as i32, 3), Some(Link::WebSocket(ConnectionId::new(3).unwrap())));
    /// assert_eq!(Link::from_wire(Transport::Websocket as i32, 0), None);
    /// assert_eq!(Link::from_wire(Transport::Http as i32, 3), None);
    /// ```
    pub fn from_wire(transport: i32, connection: u64) -> Option<Self> {
        match (Transport::try_from(transport).ok()?, ConnectionId::new(connection)) {
            (Transport::Http, None) => Some(Link::Http),
            (Transport::Websocket, Some(c)) => Some(Link::WebSocket(c)),
            _ => None,
        }
    }
}
