use serde_json::Value;
use txbus::UpcastError;

fn step(v: Value) -> Result<Value, UpcastError> {
    Ok(v)
}

// Version 3 needs a step from 2 as well.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(version = 3, upcast(1 => step))]
struct MissingStep;

// A step from the current version goes nowhere.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(version = 2, upcast(1 => step, 2 => step))]
struct StepAtVersion;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(version = 0)]
struct VersionZero;

// An upcaster of the wrong type.
fn wrong(v: Value) -> Value {
    v
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(version = 2, upcast(1 => wrong))]
struct WrongType;

fn main() {}
