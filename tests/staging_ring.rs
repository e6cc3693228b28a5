//! The placement of uploads in the CUDA staging ring of `vendor/cubecl-cuda` (compiled only with
//! the `cuda` feature): its pure part, included here so that it is tested without CUDA.

#[path = "../vendor/cubecl-cuda/src/compute/ring_place.rs"]
mod ring_place;
