#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Wrapper<T>(T);

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(title = "x")]
struct Unknown;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "")]
struct Empty;

fn main() {}
