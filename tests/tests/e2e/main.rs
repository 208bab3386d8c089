//! The end-to-end tests that start servers in this process and share it freely, as one
//! test binary: every test binary of this crate links the server and compiles the
//! client and runtime code it calls, about 45 s of a release build on 2 cores each.
//! Tests that need a process to themselves stay binaries of their own (tests/tests/*.rs):
//! ONNX Runtime absent, thread priorities and busy fractions read process-wide, and the
//! container tests.

mod access;
mod bench;
mod branches;
mod connections;
mod dashboard;
mod health;
mod ocr;
mod opencv;
mod pipelines;
mod remote;
mod serving;
mod tls;
mod tract;
mod triton_tools;
