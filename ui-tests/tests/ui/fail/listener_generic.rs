#[txbus::listener]
async fn on_anything<E: txbus::Event>(_event: E) -> Result<(), txbus::ListenerError> {
    Ok(())
}

fn main() {}
