//! orderflow's workshop: everything that runs the product from outside to measure it or to
//! break it, kept apart from the product so no reader of `server/` or `client/` wades
//! through it and no production image ships it.
//!
//! Reading order: [`deployment`] starts real `orderflow-server` processes; [`driver`] places
//! orders through their gRPC API; [`procstat`] reads their CPU and memory; [`audit`] checks a
//! deployment's final state; [`broker`] disturbs the local RabbitMQ node. Then the two tools
//! built from them: [`chaos`] (the `orderflow-chaos` binary and the resilience tests) and
//! [`bench`] (the `orderflow-bench` binary). Broker clean-up is the server's own:
//! `orderflow_server::bus::Topology::delete_all`.

pub mod audit;
pub mod bench;
pub mod broker;
pub mod chaos;
pub mod deployment;
pub mod driver;
pub mod procstat;
