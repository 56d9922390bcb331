use serde_json::{Value, json};
use txbus::{Event, UpcastError};

fn v1_to_v2(mut v: Value) -> Result<Value, UpcastError> {
    let total = v["total"].take();
    v["total_cents"] = json!(total.as_i64().ok_or_else(|| UpcastError::new("no total"))? * 100);
    Ok(v)
}

fn v2_to_v3(v: Value) -> Result<Value, UpcastError> {
    let mut v: serde_json::Map<String, Value> = serde_json::from_value(v)?;
    v.insert("currency".into(), json!("EUR"));
    Ok(Value::Object(v))
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "order.placed", version = 3, upcast(1 => v1_to_v2, 2 => v2_to_v3))]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
    currency: String,
}

// A closure is an upcaster too; an unversioned event is version 1.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(version = 2, upcast(1 => |v| Ok(v)))]
struct Renamed;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Plain;

fn main() {
    assert_eq!(OrderPlaced::VERSION, 3);
    assert_eq!(Renamed::VERSION, 2);
    assert_eq!(Plain::VERSION, 1);
    let v2 = OrderPlaced::upcast(1, json!({ "order_id": 1, "total": 2 })).unwrap();
    let v3 = OrderPlaced::upcast(2, v2).unwrap();
    let order: OrderPlaced = serde_json::from_value(v3).unwrap();
    assert_eq!((order.total_cents, order.currency.as_str()), (200, "EUR"));
    assert!(OrderPlaced::upcast(3, json!({})).is_err());
    assert!(Plain::upcast(1, json!(null)).is_err());
}
