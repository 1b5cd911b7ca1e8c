//! The control plane's own jobs: expiry warnings, webhook deliveries and purging old tokens.
//!
//! With several replicas each job runs once per period across all of them: a replica runs a
//! job only after claiming its period in the database (`Store::claim_period`), which one
//! claimant wins. Deliveries are also leased one by one, so that a slow round on one replica
//! and the next round on another never send the same event twice. `run_once` takes the time
//! as an argument, so tests drive it with any clock.

use super::audit::{self, EXPIRY_WARNING, SYSTEM};
use crate::metrics::Metrics;
use crate::store::{AuditRecord, DeliveryOutcome, Event, Store, StoreError, WarningRecord};
use crate::webhook::{self, Webhook};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The claim names of the two periodic jobs.
pub const JOBS: &str = "jobs";
pub const PURGE: &str = "purge";

/// Deliveries taken from the outbox at a time.
const DELIVERY_BATCH: u32 = 20;
/// Tokens purged per store call.
const PURGE_BATCH: u32 = 500;

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
    /// Failed attempts, given up or not.
    pub failed: usize,
    /// Of those, the events given up on.
    pub gave_up: usize,
    pub purged: usize,
}

/// What one round ran: the jobs of the periods this replica claimed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    pub jobs: bool,
    pub purge: bool,
    pub report: Report,
}

/// The tightest lead that applies to a token `remaining` seconds from expiry: a token
/// created an hour before its expiry gets one warning, not one per lead time.
pub fn lead_for(leads: &[i64], remaining: i64) -> Option<i64> {
    leads.iter().copied().filter(|l| *l >= remaining).min()
}

async fn warn(store: &dyn Store, jobs: &Jobs, now: i64) -> Result<usize, StoreError> {
    let Some(&widest) = jobs.warning_leads.iter().max() else {
        return Ok(0);
    };
    let mut issued = 0;
    for e in store.expiring(now, now.saturating_add(widest)).await? {
        let Some(expires_at) = e.token.expires_at else {
            continue;
        };
        let Some(lead) = lead_for(&jobs.warning_leads, expires_at - now) else {
            continue;
        };
        // A warning at this lead, or a tighter one, was issued for this expiry already.
        if e.warned_lead.is_some_and(|w| w <= lead) {
            continue;
        }
        let record = WarningRecord {
            token_id: e.token.id.clone(),
            expires_at,
            lead,
            at: now,
        };
        let entry = AuditRecord {
            at: now,
            actor: SYSTEM.to_string(),
            action: EXPIRY_WARNING,
            token_id: e.token.id.clone(),
            token_name: e.token.name.clone(),
            before: None,
            after: Some(serde_json::json!({
                "expires_at": audit::rfc3339(expires_at),
                "warning_lead_seconds": lead,
            })),
        };
        let event = jobs.webhook.as_ref().map(|_| {
            let (id, kind, payload) = webhook::expiring_event(&e.token, lead, now);
            Event {
                id,
                kind,
                payload,
                at: now,
            }
        });
        if store
            .record_warning(&record, &entry, event.as_ref())
            .await?
        {
            tracing::info!(token = %e.token.id, lead_seconds = lead, "expiry warning issued");
            issued += 1;
        }
    }
    Ok(issued)
}

async fn deliver(
    store: &dyn Store,
    hook: &Webhook,
    now: i64,
    report: &mut Report,
) -> Result<(), StoreError> {
    // Long enough for every attempt of the batch to time out, one after the other.
    let lease = i64::from(DELIVERY_BATCH)
        .saturating_mul(i64::try_from(hook.timeout.as_secs()).unwrap_or(i64::MAX))
        .saturating_add(60);
    let due = store
        .claim_deliveries(now, now.saturating_add(lease), DELIVERY_BATCH)
        .await?;
    for d in due {
        let (h, delivery) = (hook.clone(), d.clone());
        let result = tokio::task::spawn_blocking(move || h.send(&delivery, now))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let outcome = hook.outcome(&d, result, now);
        match &outcome {
            DeliveryOutcome::Delivered { .. } => report.delivered += 1,
            DeliveryOutcome::Retry {
                error,
                next_attempt_at,
            } => {
                report.failed += 1;
                tracing::warn!(event = %d.event_id, %error, retry_at = next_attempt_at, "webhook delivery failed; will retry");
            }
            DeliveryOutcome::GaveUp { error } => {
                report.failed += 1;
                report.gave_up += 1;
                tracing::error!(event = %d.event_id, %error, attempts = d.attempts + 1, "webhook delivery failed; giving up");
            }
        }
        store.delivery_result(d.id, &outcome).await?;
    }
    Ok(())
}

async fn purge(store: &dyn Store, retention: i64, now: i64) -> Result<usize, StoreError> {
    let cutoff = now.saturating_sub(retention);
    let mut purged = 0;
    loop {
        let batch = store.purgeable(cutoff, PURGE_BATCH).await?;
        let full = batch.len() == PURGE_BATCH as usize;
        let mut progress = false;
        for r in &batch {
            if store.purge(r, &audit::purge(now, r)).await? {
                tracing::info!(token = %r.id, "purged");
                purged += 1;
                progress = true;
            }
        }
        if !full || !progress {
            break;
        }
    }
    store.prune_outbox(cutoff).await?;
    Ok(purged)
}

/// Warnings and deliveries due at `now`; a purge when `purge` is true. Claims nothing: the
/// caller decides that this replica runs them.
pub async fn run_once(
    store: &dyn Store,
    jobs: &Jobs,
    now: i64,
    purge_now: bool,
) -> Result<Report, StoreError> {
    let mut report = Report {
        warned: warn(store, jobs, now).await?,
        ..Report::default()
    };
    // What proxies held of quotas in periods that have ended is of no more use.
    store.forget_quotas(now).await?;
    if let Some(hook) = &jobs.webhook {
        deliver(store, hook, now, &mut report).await?;
    }
    if purge_now {
        if let Some(retention) = jobs.retention {
            report.purged = purge(store, retention, now).await?;
        }
    }
    Ok(report)
}

/// One round at `now`: the jobs of every period this replica claims (`interval` seconds for
/// warnings and deliveries, the purge interval for purging).
pub async fn tick(
    store: &dyn Store,
    jobs: &Jobs,
    interval: i64,
    now: i64,
) -> Result<Round, StoreError> {
    let mut round = Round {
        jobs: store.claim_period(JOBS, now, interval).await?,
        ..Round::default()
    };
    if round.jobs {
        round.report = run_once(store, jobs, now, false).await?;
    }
    if let Some(retention) = jobs.retention {
        if jobs.purge_interval < i64::MAX
            && store.claim_period(PURGE, now, jobs.purge_interval).await?
        {
            round.purge = true;
            round.report.purged = purge(store, retention, now).await?;
        }
    }
    Ok(round)
}

/// Runs the jobs every `interval` until shutdown.
pub async fn run(
    store: Arc<dyn Store>,
    jobs: Jobs,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX);
    // The first round one interval after start: whether a period is due is the database's
    // to say (another replica may just have run it), not this process's start.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        // A round in progress finishes before shutdown is looked at again.
        match tick(store.as_ref(), &jobs, period, super::now()).await {
            Ok(round) => {
                let r = &round.report;
                metrics.webhooks(r.delivered, r.failed - r.gave_up, r.gave_up);
                if round.jobs {
                    metrics.job_run(false);
                }
                if round.purge {
                    metrics.job_run(true);
                }
            }
            Err(e) => tracing::error!(error = %e, "housekeeping failed; retrying next round"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tightest_lead_that_applies() {
        let leads = [7 * 86_400, 86_400];
        assert_eq!(lead_for(&leads, 3_600), Some(86_400));
        assert_eq!(lead_for(&leads, 3 * 86_400), Some(7 * 86_400));
        assert_eq!(lead_for(&leads, 8 * 86_400), None);
    }
}
