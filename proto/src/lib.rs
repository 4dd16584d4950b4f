//! Generated gRPC types and services of Meridian (see `proto/meridian.proto`).
//! Owns nothing but the wire format: Raft RPCs, member observations and the admin API.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("meridian.v1");
}

pub use v1::*;
