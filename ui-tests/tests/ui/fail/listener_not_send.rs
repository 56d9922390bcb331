use std::rc::Rc;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Ping;

#[txbus::listener]
async fn holds_rc(_ping: Ping) -> Result<(), txbus::ListenerError> {
    let shared = Rc::new(1);
    tokio::task::yield_now().await;
    drop(shared);
    Ok(())
}

fn main() {}
