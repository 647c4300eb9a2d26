//! Inventory reservations keyed by SKU: restock, reserve for an order, release, ship.
//!
//! Rules: quantities must be positive; a reservation needs that much available stock (on hand minus
//! reserved); an order reserves a SKU at most once; release and ship need an existing reservation.
//!
//! It also shows schema evolution: version 1 of the events stored `Restocked` quantities as `u32`;
//! version 2 (written now) uses `u64`, and [`EventSourced::upcast`] reads both.

use crate::codec::{Codec, CodecError};
use crate::stage::{Effect, EventSourced};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The inventory stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inventory;

/// Commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryCommand {
    /// Add stock.
    Restock(u64),
    /// Reserve stock for an order.
    Reserve {
        /// Order id.
        order: String,
        /// Quantity.
        qty: u64,
    },
    /// Give a reservation back.
    Release {
        /// Order id.
        order: String,
    },
    /// Ship a reserved order: the stock leaves.
    Ship {
        /// Order id.
        order: String,
    },
}

/// Events (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InventoryEvent {
    /// Stock arrived.
    Restocked {
        /// Quantity.
        qty: u64,
    },
    /// Stock was reserved.
    Reserved {
        /// Order id.
        order: String,
        /// Quantity.
        qty: u64,
    },
    /// A reservation was given back.
    Released {
        /// Order id.
        order: String,
    },
    /// A reserved order shipped.
    Shipped {
        /// Order id.
        order: String,
    },
}

/// Version 1 of the events, kept only to read old journals.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    /// Events as version 1 wrote them.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[allow(missing_docs)]
    pub enum InventoryEvent {
        Restocked { qty: u32 },
        Reserved { order: String, qty: u64 },
        Released { order: String },
        Shipped { order: String },
    }
}

impl From<v1::InventoryEvent> for InventoryEvent {
    fn from(old: v1::InventoryEvent) -> Self {
        match old {
            v1::InventoryEvent::Restocked { qty } => InventoryEvent::Restocked { qty: u64::from(qty) },
            v1::InventoryEvent::Reserved { order, qty } => InventoryEvent::Reserved { order, qty },
            v1::InventoryEvent::Released { order } => InventoryEvent::Released { order },
            v1::InventoryEvent::Shipped { order } => InventoryEvent::Shipped { order },
        }
    }
}

/// Per-SKU state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Units in the warehouse (reserved ones included).
    pub on_hand: u64,
    /// Reservations by order id.
    pub reservations: BTreeMap<String, u64>,
}

impl Stock {
    /// Units reserved.
    pub fn reserved(&self) -> u64 {
        self.reservations.values().sum()
    }

    /// Units free to reserve.
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved())
    }
}

/// Reply: the stock levels after the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Levels {
    /// On hand.
    pub on_hand: u64,
    /// Free to reserve.
    pub available: u64,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum InventoryRejection {
    /// Zero quantity.
    #[error("quantity must be positive")]
    ZeroQuantity,
    /// Not enough free stock.
    #[error("only {available} available, {requested} requested")]
    InsufficientStock {
        /// Free stock.
        available: u64,
        /// Requested.
        requested: u64,
    },
    /// The order already holds a reservation.
    #[error("order {0} already holds a reservation")]
    AlreadyReserved(String),
    /// No reservation for the order.
    #[error("order {0} holds no reservation")]
    UnknownOrder(String),
    /// Restock would overflow.
    #[error("restock would overflow the stock count")]
    Overflow,
}

fn levels(s: &Stock) -> Levels {
    Levels { on_hand: s.on_hand, available: s.available() }
}

impl EventSourced for Inventory {
    const NAME: &'static str = "inventory";
    const EVENT_VERSION: u16 = 2;
    type Key = String;
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    type State = Stock;
    type Reply = Levels;
    type Rejection = InventoryRejection;

    fn handle(&self, stock: &Stock, command: InventoryCommand) -> Result<Effect<Self>, InventoryRejection> {
        use InventoryCommand::*;
        use InventoryRejection::*;
        let event = match command {
            Restock(0) | Reserve { qty: 0, .. } => return Err(ZeroQuantity),
            Restock(qty) => {
                stock.on_hand.checked_add(qty).ok_or(Overflow)?;
                InventoryEvent::Restocked { qty }
            }
            Reserve { order, .. } if stock.reservations.contains_key(&order) => return Err(AlreadyReserved(order)),
            Reserve { qty, .. } if qty > stock.available() => {
                return Err(InsufficientStock { available: stock.available(), requested: qty })
            }
            Reserve { order, qty } => InventoryEvent::Reserved { order, qty },
            Release { order } | Ship { order } if !stock.reservations.contains_key(&order) => {
                return Err(UnknownOrder(order))
            }
            Release { order } => InventoryEvent::Released { order },
            Ship { order } => InventoryEvent::Shipped { order },
        };
        Ok(Effect::persist([event]).then_reply(levels))
    }

    fn apply(stock: &mut Stock, event: &InventoryEvent) {
        match event {
            InventoryEvent::Restocked { qty } => stock.on_hand += qty,
            InventoryEvent::Reserved { order, qty } => {
                stock.reservations.insert(order.clone(), *qty);
            }
            InventoryEvent::Released { order } => {
                stock.reservations.remove(order);
            }
            InventoryEvent::Shipped { order } => {
                let qty = stock.reservations.remove(order).unwrap_or(0);
                stock.on_hand -= qty;
            }
        }
    }

    fn upcast(version: u16, codec: Codec, payload: &[u8]) -> Result<InventoryEvent, CodecError> {
        match version {
            1 => codec.decode::<v1::InventoryEvent>(payload).map(InventoryEvent::from),
            2 => codec.decode(payload),
            found => Err(CodecError::UnknownVersion { found, current: Self::EVENT_VERSION }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InventoryCommand::*;
    use super::InventoryEvent::*;
    use super::*;
    use crate::testkit::StageTest;

    fn order(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn reserve_release_ship() {
        let stocked = StageTest::new(Inventory).given([Restocked { qty: 10 }]);
        stocked
            .when(Reserve { order: order("o1"), qty: 4 })
            .then_events([Reserved { order: order("o1"), qty: 4 }])
            .then_reply(Levels { on_hand: 10, available: 6 });
        let reserved =
            StageTest::new(Inventory).given([Restocked { qty: 10 }, Reserved { order: order("o1"), qty: 4 }]);
        reserved.when(Ship { order: order("o1") }).then_reply(Levels { on_hand: 6, available: 6 });
        reserved.when(Release { order: order("o1") }).then_reply(Levels { on_hand: 10, available: 10 });
    }

    #[test]
    fn rejections() {
        let reserved =
            StageTest::new(Inventory).given([Restocked { qty: 10 }, Reserved { order: order("o1"), qty: 4 }]);
        reserved
            .when(Reserve { order: order("o2"), qty: 7 })
            .then_rejected(InventoryRejection::InsufficientStock { available: 6, requested: 7 });
        reserved
            .when(Reserve { order: order("o1"), qty: 1 })
            .then_rejected(InventoryRejection::AlreadyReserved(order("o1")));
        reserved.when(Ship { order: order("o9") }).then_rejected(InventoryRejection::UnknownOrder(order("o9")));
        reserved.when(Restock(0)).then_rejected(InventoryRejection::ZeroQuantity);
    }

    #[test]
    fn upcasts_version_1_events() {
        for codec in [Codec::Bincode, Codec::Json] {
            let old = codec.encode(&v1::InventoryEvent::Restocked { qty: 7 }).unwrap();
            assert_eq!(Inventory::upcast(1, codec, &old).unwrap(), Restocked { qty: 7 });
            assert!(Inventory::upcast(3, codec, &old).is_err());
        }
    }
}
