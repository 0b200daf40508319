//! Integration tests: one test binary so kube and the AWS SDK link once.
//! `support/` holds the wire-level doubles and the agent harness; each other module is a topic that
//! reads as a specification.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

mod admin;
mod churn;
mod container_credentials;
mod doubles_selftest;
mod events;
mod faults;
mod federation;
mod footprint;
mod logging;
mod malformed;
mod metadata;
mod moto;
mod pod_token;
mod process;
mod refusals;
mod serving;
mod spire;
mod views;
mod watch;
