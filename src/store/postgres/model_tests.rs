//! The engine's model-based check on this store: random sequences of puts,
//! batches, leases, extensions, reports, results, cancels, pauses and
//! purges, every answer and every queue's counters compared with the
//! reference model after each step (`broker::model::run_on_store`, which
//! says what it leaves out and why). Against a real PostgreSQL the tests
//! start themselves (tests/common/postgres.rs), one schema per sequence.

use super::harness;
use super::{PgStore, PostgresConfig};
use crate::broker::model::{Rng, run_on_store, store_config};
use crate::store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_agree_with_the_model_on_postgres() {
    let database = harness::TestDatabase::start().await;
    for seed in 1..=16u64 {
        let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut config = PostgresConfig::new(database.url());
        config.schema = format!("model_{}", seed % 1_000_000);
        let store = PgStore::connect(&config, store_config())
            .await
            .unwrap_or_else(|error| panic!("the store opens on {}: {error}", database.url()));
        run_on_store(
            &store,
            &mut Rng(seed),
            &format!("postgres, seed {seed}"),
            300,
        )
        .await;
        store.close();
    }
}
