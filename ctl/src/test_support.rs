//! Fixtures shared by the CLI's unit tests (the intents live in the node library).

pub use meridian_node::fixtures::four_member_intent;
