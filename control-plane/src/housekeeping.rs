//! The control plane's own jobs: expiry warnings, webhook deliveries and purging old tokens.
//! `run_once` takes the time as an argument so tests drive it with any clock.

use crate::store::{Store, StoreError};
use crate::webhook::{self, Webhook};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone)]
pub struct Jobs {
    /// Lead times before expiry at which to warn (seconds); empty: no warnings.
    pub warning_leads: Vec<i64>,
    /// How long revoked or expired tokens are kept; `None`: never purged.
    pub retention: Option<i64>,
    /// Seconds between purges.
    pub purge_interval: i64,
    pub webhook: Option<Webhook>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub warned: usize,
    pub delivered: usize,
    pub failed: usize,
    pub purged: usize,
}

/// Warnings and deliveries due at `now`; a purge when `purge` is true. Blocking.
pub fn run_once(
    store: &dyn Store,
    jobs: &Jobs,
    now: i64,
    purge: bool,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    if !jobs.warning_leads.is_empty() {
        let make = |w: &crate::store::Warning| webhook::expiring_event(w, now);
        let event: crate::store::WebhookEvent<'_> = match jobs.webhook {
            Some(_) => Some(&make),
            None => None,
        };
        let warned = store.warn_expiring(now, &jobs.warning_leads, event)?;
        for w in &warned {
            tracing::info!(token = %w.token.id, lead_seconds = w.lead_seconds, "expiry warning issued");
        }
        report.warned = warned.len();
    }
    if let Some(hook) = &jobs.webhook {
        for d in store.due_deliveries(now, 100)? {
            let result = hook.send(&d, now);
            let outcome = hook.outcome(&d, result, now);
            match &outcome {
                crate::store::DeliveryOutcome::Delivered { .. } => report.delivered += 1,
                crate::store::DeliveryOutcome::Retry {
                    error,
                    next_attempt_at,
                } => {
                    report.failed += 1;
                    tracing::warn!(event = %d.event_id, %error, retry_at = next_attempt_at, "webhook delivery failed; will retry");
                }
                crate::store::DeliveryOutcome::GaveUp { error } => {
                    report.failed += 1;
                    tracing::error!(event = %d.event_id, %error, attempts = d.attempts + 1, "webhook delivery failed; giving up");
                }
            }
            store.delivery_result(d.id, &outcome)?;
        }
    }
    if purge {
        if let Some(retention) = jobs.retention {
            let purged = store.purge(now, now.saturating_sub(retention))?;
            for r in &purged {
                tracing::info!(token = %r.id, "purged");
            }
            report.purged = purged.len();
        }
    }
    Ok(report)
}

/// Runs the jobs every `interval` until shutdown.
pub async fn run(
    store: Arc<dyn Store>,
    jobs: Jobs,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_purge: Option<i64> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = chrono::Utc::now().timestamp();
        let purge = last_purge.is_none_or(|t| now - t >= jobs.purge_interval);
        if purge {
            last_purge = Some(now);
        }
        let (store, jobs) = (store.clone(), jobs.clone());
        let done =
            tokio::task::spawn_blocking(move || run_once(store.as_ref(), &jobs, now, purge)).await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "housekeeping failed; retrying next round"),
            Err(e) => tracing::error!(error = %e, "housekeeping task failed"),
        }
    }
}
