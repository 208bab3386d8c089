//! The wire protocol sluice speaks: KServe v2 as Triton defines it (package `inference`,
//! service `GRPCInferenceService`), so Triton's clients and `perf_analyzer` work unchanged.

#![allow(clippy::all, missing_docs)]

pub mod inference {
    tonic::include_proto!("inference");
}

pub use inference::*;
