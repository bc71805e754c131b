//! The invariants, each read from the services' own databases, the event store, the broker and
//! the files the run left, never from what the demo counted while it ran.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use concord_sdk::Client;
use concord_sdk::broker::Broker;
use serde_json::Value;
use sqlx::Row as _;

use super::model::Invariant;
use super::plan::{DECLINED_CARD, GOOD_CARDS, Plan};
use crate::common::Db;
use crate::orders::domain::{Order, Status};

/// Where the checker looks.
pub struct Sources<'a> {
    pub admin: &'a Client,
    pub north: &'a Db,
    pub south: &'a Db,
    pub payments: &'a Db,
    pub query: &'a Db,
    pub provider: &'a Db,
    /// The query service, to read through its cache.
    pub query_url: &'a str,
    pub token: &'a str,
    /// The demo's own TLS, on a `--tls` run.
    pub tls: &'a concord_sdk::ClientTls,
    /// Every file of the run (databases, logs, traces).
    pub files: Vec<PathBuf>,
    /// PostgreSQL databases to read every row of (the scale-out shape).
    pub pg_databases: Vec<(String, Db)>,
    /// The broker the stock changes went through, when it is not the event store, with the
    /// JetStream server and stream that hold them (to know how many there are).
    pub external_broker: Option<Arc<dyn Broker>>,
    pub nats_stream: Option<(String, String)>,
    /// Redis and the cache's key prefix.
    pub redis: Option<(String, String)>,
    pub plan: &'a Plan,
    /// The host each step of the saga calls, as the breaker journal names hosts.
    pub step_hosts: HashMap<String, String>,
    /// The saga calls at once the inventory service may get, from all of Concord.
    pub inventory_limit: u32,
    /// The host the run took down long enough to open its breaker, if it did.
    pub outage_host: Option<String>,
}

/// What the run ended with, beside the verdicts.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub orders: usize,
    pub confirmed: usize,
    pub rejected: usize,
    pub sagas_completed: usize,
    pub sagas_compensated: usize,
    pub sagas_other: usize,
    pub sagas_retried: usize,
    pub attempts_retried: usize,
    pub transfers_committed: usize,
    pub transfers_aborted: usize,
    /// A saga that was retried or compensated, for the timeline.
    pub sample_saga: Option<concord_sdk::SagaOut>,
    /// Orders reserved in both warehouses at once (a parallel group).
    pub reserved_in_both: usize,
    /// Express orders that booked a courier.
    pub couriers_booked: usize,
    /// Review holds ended by the operator's signal, and by their timeout.
    pub holds_cleared: usize,
    pub holds_timed_out: usize,
    /// Charges the provider confirmed later, through the step's completion URL.
    pub charges_completed_later: usize,
    pub sagas_cancelled: usize,
    /// Breaker openings in the journal (failed probes included).
    pub breaker_openings: usize,
    /// The most saga calls the inventory service saw in at once.
    pub inventory_peak: usize,
}

fn verdict(name: &str, problems: &[String], ok_detail: String) -> Invariant {
    Invariant {
        name: name.to_owned(),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            ok_detail
        } else {
            let mut d = problems.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
            if problems.len() > 3 {
                d.push_str(&format!("; and {} more", problems.len() - 3));
            }
            d
        },
    }
}

/// Every order in the log, folded from its stream, and the streams holding more than one
/// terminal event (which the fold would pass over).
async fn orders_from_log(admin: &Client) -> anyhow::Result<(BTreeMap<String, Order>, Vec<String>)> {
    let mut by_stream: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    let mut after = 0;
    let mut head = 0;
    loop {
        let page = admin.read_log(after, 1000, Some("order")).await?;
        let Some(last) = page.events.last() else { break };
        after = last.position;
        for e in &page.events {
            head = head.max(e.position);
            by_stream
                .entry(e.stream.clone())
                .or_default()
                .push((e.event_type.clone(), e.data.clone()));
        }
    }
    let twice: Vec<String> = by_stream
        .iter()
        .filter(|(_, events)| {
            events
                .iter()
                .filter(|(t, _)| t == crate::orders::domain::CONFIRMED || t == crate::orders::domain::REJECTED)
                .count()
                > 1
        })
        .map(|(stream, _)| stream.clone())
        .collect();
    let mut orders = BTreeMap::new();
    for (stream, events) in by_stream {
        if let Some(order) = Order::fold(events.iter().map(|(t, d)| (t.as_str(), d))) {
            orders.insert(stream.trim_start_matches("order-").to_owned(), order);
        }
    }
    let _ = head;
    Ok((orders, twice))
}

async fn all_sagas(admin: &Client) -> anyhow::Result<Vec<concord_sdk::SagaOut>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = admin.list_sagas(None, after.as_deref(), 500).await?;
        let n = page.sagas.len();
        out.extend(page.sagas);
        match page.next {
            Some(next) if n > 0 => after = Some(next),
            _ => break,
        }
    }
    Ok(out)
}

async fn rows(db: &Db, sql: &'static str) -> Result<Vec<Vec<Value>>, sqlx::Error> {
    fn cell<R: sqlx::Row>(r: &R, i: usize) -> Value
    where
        for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        usize: sqlx::ColumnIndex<R>,
    {
        if let Ok(v) = r.try_get::<i64, _>(i) {
            Value::from(v)
        } else if let Ok(v) = r.try_get::<String, _>(i) {
            Value::from(v)
        } else {
            Value::Null
        }
    }
    crate::with_db!(db, |p| {
        let rs = sqlx::query(sql).fetch_all(p).await?;
        Ok(rs.iter().map(|r| (0..r.len()).map(|i| cell(r, i)).collect()).collect())
    })
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Runs every check.
///
/// # Errors
/// When a source cannot be read at all (that is no verdict: the run is broken).
pub async fn check(s: &Sources<'_>, facts: &mut Facts) -> anyhow::Result<Vec<Invariant>> {
    let (orders, twice) = orders_from_log(s.admin).await?;
    facts.orders = orders.len();
    facts.confirmed = orders.values().filter(|o| o.status == Status::Confirmed).count();
    facts.rejected = orders.values().filter(|o| o.status == Status::Rejected).count();
    let sagas = all_sagas(s.admin).await?;
    let mut invariants = Vec::new();

    invariants.push(one_order_per_request(s.plan, &orders));
    invariants.push(stock_conserved(s, &orders).await?);
    invariants.push(money_conserved(s, &orders).await?);
    let details = sagas_terminal(s, &orders, &twice, &sagas, facts).await?;
    invariants.push(details.0);
    invariants.push(saga_paths(s, &orders, &details.1, facts).await?);
    invariants.push(no_double_charge(s).await?);
    invariants.push(read_model(s, &orders).await?);
    invariants.push(no_plaintext_card(s).await?);
    invariants.push(transfers_atomic(s, facts).await?);
    invariants.push(flow_control(s, &details.1, facts).await?);
    Ok(invariants)
}

/// Each planned request made exactly one order, whatever the duplicates and retries.
fn one_order_per_request(plan: &Plan, orders: &BTreeMap<String, Order>) -> Invariant {
    let mut problems = Vec::new();
    let planned: BTreeSet<String> = plan.orders.iter().map(super::plan::PlannedOrder::order_id).collect();
    for id in &planned {
        if !orders.contains_key(id) {
            problems.push(format!("order {id} was never recorded"));
        }
    }
    for id in orders.keys() {
        if !planned.contains(id) {
            problems.push(format!("order {id} matches no request"));
        }
    }
    verdict(
        "one order per request (duplicate submissions deduplicated)",
        &problems,
        format!("{} requests, {} orders in the log", planned.len(), orders.len()),
    )
}

async fn stock_conserved(s: &Sources<'_>, orders: &BTreeMap<String, Order>) -> anyhow::Result<Invariant> {
    let mut problems = Vec::new();
    let mut initial: BTreeMap<String, i64> = BTreeMap::new();
    let mut now: BTreeMap<String, i64> = BTreeMap::new();
    let mut held = 0;
    for db in [s.north, s.south] {
        for r in rows(db, "SELECT sku, initial, on_hand, reserved, shipped, held FROM stock").await? {
            *initial.entry(text(&r[0])).or_default() += int(&r[1]);
            *now.entry(text(&r[0])).or_default() += int(&r[2]) + int(&r[3]) + int(&r[4]) + int(&r[5]);
            held += int(&r[5]);
        }
    }
    for (sku, i) in &initial {
        let n = now.get(sku).copied().unwrap_or(0);
        if *i != n {
            problems.push(format!("{sku}: initial {i} ≠ on hand + reserved + shipped + held {n}"));
        }
    }
    if held != 0 {
        problems.push(format!("{held} units still held by unfinished transfers"));
    }
    // The columns agree with the reservations, and each reservation with its order's fate.
    let mut by_sku: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in [
        rows(s.north, "SELECT order_id, sku, qty, state, warehouse FROM reservations").await?,
        rows(s.south, "SELECT order_id, sku, qty, state, warehouse FROM reservations").await?,
    ]
    .concat()
    {
        let (order_id, sku, qty, state) = (text(&r[0]), text(&r[1]), int(&r[2]), text(&r[3]));
        let e = by_sku.entry(format!("{}.{sku}", text(&r[4]))).or_default();
        match state.as_str() {
            "reserved" => e.0 += qty,
            "shipped" => e.1 += qty,
            _ => {}
        }
        let expected = match orders.get(&order_id).map(|o| o.status) {
            Some(Status::Confirmed) => "shipped",
            Some(Status::Rejected) => "released",
            _ => "reserved",
        };
        if state != expected {
            problems.push(format!("order {order_id}: reservation {state}, expected {expected}"));
        }
    }
    for db in [s.north, s.south] {
        for r in rows(db, "SELECT warehouse, sku, reserved, shipped FROM stock").await? {
            let key = format!("{}.{}", text(&r[0]), text(&r[1]));
            let (reserved, shipped) = by_sku.get(&key).copied().unwrap_or_default();
            if (reserved, shipped) != (int(&r[2]), int(&r[3])) {
                problems.push(format!(
                    "{key}: columns say {} reserved / {} shipped, reservations {reserved} / {shipped}",
                    int(&r[2]),
                    int(&r[3])
                ));
            }
        }
    }
    let total: i64 = initial.values().sum();
    Ok(verdict(
        "stock is conserved (initial = on hand + reserved + shipped)",
        &problems,
        format!("{total} units over {} skus in 2 warehouses", initial.len()),
    ))
}

async fn money_conserved(s: &Sources<'_>, orders: &BTreeMap<String, Order>) -> anyhow::Result<Invariant> {
    let confirmed: i64 = orders
        .values()
        .filter(|o| o.status == Status::Confirmed)
        .map(|o| o.placed.total)
        .sum();
    let ledger = rows(
        s.provider,
        "SELECT kind, status, CAST(SUM(amount) AS BIGINT) FROM ledger GROUP BY kind, status",
    )
    .await?;
    let sum = |kind: &str, status: &str| {
        ledger
            .iter()
            .filter(|r| text(&r[0]) == kind && text(&r[1]) == status)
            .map(|r| int(&r[2]))
            .sum::<i64>()
    };
    let (charged, refunded) = (sum("charge", "captured"), sum("refund", "refunded"));
    let kept: i64 = rows(
        s.payments,
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM charges WHERE state = 'charged'",
    )
    .await?
    .first()
    .map_or(0, |r| int(&r[0]));
    let mut problems = Vec::new();
    // Every asynchronous charge was decided and its result taken by payments.
    for r in rows(
        s.provider,
        "SELECT order_id, status, delivered FROM ledger WHERE webhook_url IS NOT NULL AND (status = 'pending' OR delivered <> 1)",
    )
    .await?
    {
        problems.push(format!(
            "order {}: the provider's charge is {} (webhook delivered: {}; 1 is 2xx)",
            text(&r[0]),
            text(&r[1]),
            int(&r[2])
        ));
    }
    // Order by order, so an error on one cannot hide behind an error of the same amount on
    // another.
    let net: HashMap<String, i64> = rows(
        s.provider,
        "SELECT order_id, CAST(SUM(CASE WHEN kind = 'charge' AND status = 'captured' THEN amount \
         WHEN kind = 'refund' THEN -amount ELSE 0 END) AS BIGINT) FROM ledger GROUP BY order_id",
    )
    .await?
    .iter()
    .map(|r| (text(&r[0]), int(&r[1])))
    .collect();
    let kept_by_order: HashMap<String, i64> = rows(
        s.payments,
        "SELECT order_id, amount FROM charges WHERE state = 'charged'",
    )
    .await?
    .iter()
    .map(|r| (text(&r[0]), int(&r[1])))
    .collect();
    for (id, o) in orders {
        let owed = if o.status == Status::Confirmed {
            o.placed.total
        } else {
            0
        };
        let at_provider = net.get(id).copied().unwrap_or(0);
        if at_provider != owed {
            problems.push(format!(
                "order {id} ({}): the provider holds {at_provider}, owed {owed}",
                o.status.as_str()
            ));
        }
        let in_payments = kept_by_order.get(id).copied().unwrap_or(0);
        if in_payments != owed {
            problems.push(format!(
                "order {id} ({}): payments kept {in_payments}, owed {owed}",
                o.status.as_str()
            ));
        }
    }
    if charged - refunded != confirmed {
        problems.push(format!(
            "provider: charged {charged} − refunded {refunded} = {} ≠ confirmed orders {confirmed}",
            charged - refunded
        ));
    }
    if kept != confirmed {
        problems.push(format!("payments: charges kept {kept} ≠ confirmed orders {confirmed}"));
    }
    Ok(verdict(
        "money is conserved (charged − refunded = total of confirmed orders)",
        &problems,
        format!("charged {charged} − refunded {refunded} = {confirmed} cents, confirmed"),
    ))
}

async fn sagas_terminal(
    s: &Sources<'_>,
    orders: &BTreeMap<String, Order>,
    twice: &[String],
    sagas: &[concord_sdk::SagaOut],
    facts: &mut Facts,
) -> anyhow::Result<(Invariant, Vec<concord_sdk::SagaOut>)> {
    let mut problems: Vec<String> = twice
        .iter()
        .map(|stream| format!("{stream} was both confirmed and rejected, or one of them twice"))
        .collect();
    let by_id: HashMap<&str, &concord_sdk::SagaOut> = sagas.iter().map(|g| (g.id.as_str(), g)).collect();
    for (id, order) in orders {
        let saga_id = crate::orders::app::saga_id(id);
        let Some(saga) = by_id.get(saga_id.as_str()) else {
            problems.push(format!("order {id} has no saga"));
            continue;
        };
        let expected = match saga.status.as_str() {
            "completed" => Status::Confirmed,
            // Cancelled by support: compensated like a refusal, the order rejected.
            "compensated" | "cancelled" => Status::Rejected,
            other => {
                problems.push(format!("saga {saga_id} is {other}"));
                continue;
            }
        };
        if order.status != expected {
            problems.push(format!(
                "saga {saga_id} {} but order {}",
                saga.status,
                order.status.as_str()
            ));
        }
    }
    facts.sagas_completed = sagas.iter().filter(|g| g.status == "completed").count();
    facts.sagas_compensated = sagas.iter().filter(|g| g.status == "compensated").count();
    facts.sagas_cancelled = sagas.iter().filter(|g| g.status == "cancelled").count();
    facts.sagas_other = sagas.len() - facts.sagas_completed - facts.sagas_compensated - facts.sagas_cancelled;
    // Attempts per saga: each detail read once.
    let mut details = Vec::with_capacity(sagas.len());
    for g in sagas {
        let detail = s.admin.saga(&g.id, None).await?;
        details.push(detail.clone());
        let extra: usize = detail
            .steps
            .iter()
            .flat_map(|st| st.attempts.iter())
            .filter(|a| a.attempt > 1)
            .count();
        if extra > 0 {
            facts.sagas_retried += 1;
            facts.attempts_retried += extra;
        }
        let interesting = extra > 0
            && detail.status == "compensated"
            && detail
                .steps
                .iter()
                .any(|st| st.compensation == "succeeded" && st.name == "charge");
        if facts.sample_saga.is_none() && interesting {
            facts.sample_saga = Some(detail);
        }
    }
    if facts.sample_saga.is_none()
        && let Some(g) = sagas.first()
    {
        facts.sample_saga = Some(s.admin.saga(&g.id, None).await?);
    }
    let verdict = verdict(
        "every saga is terminal and matches its order",
        &problems,
        format!(
            "{} completed = confirmed, {} compensated and {} cancelled = rejected",
            facts.sagas_completed, facts.sagas_compensated, facts.sagas_cancelled
        ),
    );
    Ok((verdict, details))
}

/// Each order's saga took the path its order asks for: both warehouses reserved at once for a
/// split order and only then, a courier for an express order and only then (and booked exactly
/// while the order stands), a fraud-review hold for a large order ended by the operator or its
/// timeout, and no skipped step ever compensated.
async fn saga_paths(
    s: &Sources<'_>,
    orders: &BTreeMap<String, Order>,
    details: &[concord_sdk::SagaOut],
    facts: &mut Facts,
) -> anyhow::Result<Invariant> {
    let mut problems = Vec::new();
    let planned: HashMap<String, &super::plan::PlannedOrder> =
        s.plan.orders.iter().map(|o| (o.order_id(), o)).collect();
    facts.charges_completed_later = rows(
        s.payments,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM pending_charges WHERE completed = 1",
    )
    .await?
    .first()
    .map_or(0, |r| usize::try_from(int(&r[0])).unwrap_or(0));
    let couriers: HashMap<String, String> = rows(s.north, "SELECT order_id, state FROM couriers")
        .await?
        .into_iter()
        .map(|r| (text(&r[0]), text(&r[1])))
        .collect();
    for g in details {
        let Some(order_id) = g.id.strip_prefix("order-") else {
            continue;
        };
        let Some(plan) = planned.get(order_id) else {
            problems.push(format!("saga {} is of no planned order", g.id));
            continue;
        };
        let step = |name: &str| g.steps.iter().find(|st| st.name == name);
        let completed = g.status == "completed";
        for (name, runs) in [
            ("reserve-south", plan.ships_from_both()),
            ("courier", plan.express),
            ("review", plan.reviewed()),
        ] {
            let Some(st) = step(name) else {
                problems.push(format!("saga {} has no step {name}", g.id));
                continue;
            };
            let skipped = st.action == "skipped";
            if skipped && st.compensation != "not_needed" {
                problems.push(format!(
                    "saga {}: skipped {name} is compensated ({})",
                    g.id, st.compensation
                ));
            }
            // A saga that compensated early never reached the later steps: pending is right then.
            let reached = st.action != "pending";
            if reached && skipped == runs {
                problems.push(format!(
                    "saga {}: {name} {} but the order asks otherwise",
                    g.id, st.action
                ));
            }
            if completed && runs && st.action != "succeeded" {
                problems.push(format!("saga {} completed with {name} {}", g.id, st.action));
            }
        }
        if completed && plan.ships_from_both() {
            facts.reserved_in_both += 1;
        }
        if let Some(review) = step("review").filter(|st| completed && st.action == "succeeded") {
            match &review.output {
                Some(Value::Null) | None => facts.holds_timed_out += 1,
                Some(_) => facts.holds_cleared += 1,
            }
        }
        let booked = couriers.get(order_id).map(String::as_str);
        let expected = match orders.get(order_id).map(|o| o.status) {
            Some(Status::Confirmed) if plan.express => Some("booked"),
            _ if !plan.express => None,
            // A rejected express order: cancelled, or never booked.
            _ => booked.filter(|b| *b == "cancelled"),
        };
        if booked != expected {
            problems.push(format!("order {order_id}: courier {booked:?}, expected {expected:?}"));
        }
        if booked == Some("booked") {
            facts.couriers_booked += 1;
        }
    }
    Ok(verdict(
        "each saga took its order's path (parallel reserve, courier, review hold)",
        &problems,
        format!(
            "{} reserved in both warehouses at once, {} couriers booked, review holds: {} cleared by the operator, {} timed out",
            facts.reserved_in_both, facts.couriers_booked, facts.holds_cleared, facts.holds_timed_out
        ),
    ))
}

async fn no_double_charge(s: &Sources<'_>) -> anyhow::Result<Invariant> {
    let twice = rows(
        s.provider,
        "SELECT order_id, CAST(COUNT(*) AS BIGINT) FROM ledger WHERE kind = 'charge' AND status = 'captured' \
         GROUP BY order_id HAVING COUNT(*) > 1",
    )
    .await?;
    let problems: Vec<String> = twice
        .iter()
        .map(|r| format!("order {} charged {} times", text(&r[0]), int(&r[1])))
        .collect();
    let charges = rows(
        s.provider,
        "SELECT CAST(COUNT(*) AS BIGINT) FROM ledger WHERE kind = 'charge'",
    )
    .await?;
    Ok(verdict(
        "no card was charged twice for one order",
        &problems,
        format!(
            "{} charge requests reached the provider's ledger",
            charges.first().map_or(0, |r| int(&r[0]))
        ),
    ))
}

async fn read_model(s: &Sources<'_>, orders: &BTreeMap<String, Order>) -> anyhow::Result<Invariant> {
    let mut problems = Vec::new();
    let view = rows(s.query, "SELECT order_id, status, total, customer FROM orders_view").await?;
    let seen: BTreeMap<String, (String, i64, String)> = view
        .iter()
        .map(|r| (text(&r[0]), (text(&r[1]), int(&r[2]), text(&r[3]))))
        .collect();
    for (id, o) in orders {
        let expected = (o.status.as_str().to_owned(), o.placed.total, o.placed.customer.clone());
        match seen.get(id) {
            Some(row) if *row == expected => {}
            Some(row) => problems.push(format!("order {id}: read model {row:?}, log {expected:?}")),
            None => problems.push(format!("order {id} missing from the read model")),
        }
    }
    for id in seen.keys() {
        if !orders.contains_key(id) {
            problems.push(format!("order {id} is in the read model only"));
        }
    }
    // Stock: the view holds what the inventory holds, change for change.
    let mut source = BTreeMap::new();
    for db in [s.north, s.south] {
        for r in rows(
            db,
            "SELECT warehouse, sku, on_hand, reserved, shipped, held, version FROM stock",
        )
        .await?
        {
            source.insert((text(&r[0]), text(&r[1])), r[2..].iter().map(int).collect::<Vec<_>>());
        }
    }
    let mirrored: BTreeMap<_, _> = rows(
        s.query,
        "SELECT warehouse, sku, on_hand, reserved, shipped, held, version FROM stock_view",
    )
    .await?
    .into_iter()
    .map(|r| ((text(&r[0]), text(&r[1])), r[2..].iter().map(int).collect::<Vec<_>>()))
    .collect();
    for (k, v) in &source {
        if mirrored.get(k) != Some(v) {
            problems.push(format!(
                "stock {}.{}: view {:?}, inventory {v:?}",
                k.0,
                k.1,
                mirrored.get(k)
            ));
        }
    }
    // Reads through the cache answer what the table holds.
    let http = crate::common::http_client(Duration::from_secs(5), s.tls)?;
    let mut through_cache = 0;
    for id in orders.keys().take(25) {
        let got: Value = http
            .get(format!("{}/orders/{id}", s.query_url))
            .bearer_auth(s.token)
            .send()
            .await?
            .json()
            .await?;
        let want = seen.get(id).map(|r| r.0.clone()).unwrap_or_default();
        if got["status"].as_str() != Some(want.as_str()) {
            problems.push(format!(
                "order {id}: the cache answered {}, the table {want}",
                got["status"]
            ));
        }
        through_cache += 1;
    }
    for ((warehouse, sku), v) in source.iter().take(10) {
        let got: Value = http
            .get(format!("{}/stock/{warehouse}/{sku}", s.query_url))
            .bearer_auth(s.token)
            .send()
            .await?
            .json()
            .await?;
        if got["version"].as_i64() != v.get(4).copied() {
            problems.push(format!(
                "stock {warehouse}.{sku}: the cache answered version {}",
                got["version"]
            ));
        }
        through_cache += 1;
    }
    Ok(verdict(
        "the query read model equals a replay of the log",
        &problems,
        format!(
            "{} orders and {} stock rows equal; {through_cache} reads through the cache agree",
            orders.len(),
            source.len()
        ),
    ))
}

fn cards() -> Vec<&'static str> {
    let mut c = GOOD_CARDS.to_vec();
    c.push(DECLINED_CARD);
    c
}

async fn no_plaintext_card(s: &Sources<'_>) -> anyhow::Result<Invariant> {
    let cards = cards();
    let mut problems = Vec::new();
    let mut scanned_bytes = 0usize;
    for f in &s.files {
        let Ok(bytes) = std::fs::read(f) else { continue };
        scanned_bytes += bytes.len();
        for card in &cards {
            if memfind(&bytes, card.as_bytes()) {
                problems.push(format!("{} holds a card number", f.display()));
            }
        }
    }
    let mut rows_read = 0usize;
    for (name, db) in &s.pg_databases {
        let Db::Pg(pool) = db else { continue };
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
        )
        .fetch_all(pool)
        .await?;
        for table in tables {
            let sql = format!("SELECT t::text FROM \"{}\" t", table.replace('"', "\"\""));
            let texts: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?;
            rows_read += texts.len();
            for t in texts {
                if cards.iter().any(|c| t.contains(c)) {
                    problems.push(format!("database {name}, table {table} holds a card number"));
                    break;
                }
            }
        }
    }
    let mut messages = 0usize;
    let mut expected = 0u64;
    if let Some(broker) = &s.external_broker {
        let mut consumer = broker
            .subscribe(
                crate::inventory::domain::STOCK_TOPIC,
                &format!("card-scan-{}", uuid::Uuid::new_v4().simple()),
            )
            .await?;
        expected = match &s.nats_stream {
            Some((url, name)) => {
                let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await?);
                js.get_stream(name).await?.info().await?.state.messages
            }
            None => 0,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let batch = consumer.fetch(1000, Duration::from_millis(500)).await?;
            if batch.is_empty() && (messages as u64 >= expected || std::time::Instant::now() > deadline) {
                break;
            }
            for d in &batch {
                messages += 1;
                let text = format!("{} {:?}", d.message.payload, d.message.headers);
                if cards.iter().any(|c| text.contains(c)) {
                    problems.push(format!("broker message {} holds a card number", d.message.id));
                }
                consumer.ack(d).await?;
            }
        }
    }
    if s.external_broker.is_some() && (messages as u64) < expected {
        problems.push(format!(
            "the broker holds {expected} messages; only {messages} could be read"
        ));
    }
    let mut redis_keys = 0usize;
    if let Some((url, prefix)) = &s.redis {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await?;
        for k in keys {
            redis_keys += 1;
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query_async(&mut conn).await.unwrap_or(None);
            if let Some(v) = v
                && cards.iter().any(|c| memfind(&v, c.as_bytes()))
            {
                problems.push(format!("redis key {k} holds a card number"));
            }
        }
    }
    let mut detail = format!("{} files ({} KiB)", s.files.len(), scanned_bytes / 1024);
    if !s.pg_databases.is_empty() {
        detail.push_str(&format!(", {rows_read} rows of {} databases", s.pg_databases.len()));
    }
    if s.external_broker.is_some() {
        detail.push_str(&format!(", {messages} broker messages"));
    }
    if s.redis.is_some() {
        detail.push_str(&format!(", {redis_keys} cache keys"));
    }
    detail.push_str(" scanned: no card number");
    Ok(verdict(
        "no plaintext card number in any database, the log, the broker or a log file",
        &problems,
        detail,
    ))
}

fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn transfers_atomic(s: &Sources<'_>, facts: &mut Facts) -> anyhow::Result<Invariant> {
    let mut problems = Vec::new();
    let mut applied: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for db in [s.north, s.south] {
        for r in rows(db, "SELECT xid, warehouse, state FROM transfers").await? {
            let (xid, warehouse, state) = (text(&r[0]), text(&r[1]), text(&r[2]));
            if state == "applied" {
                applied.entry(xid).or_default().insert(warehouse);
            } else if state == "held" {
                problems.push(format!("transfer {xid} is still held at {warehouse}"));
            }
        }
    }
    let mut transactions = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.admin.list_transactions(None, None, after.as_deref(), 1000).await?;
        let n = page.transactions.len();
        transactions.extend(page.transactions);
        match page.next {
            Some(next) if n > 0 => after = Some(next),
            _ => break,
        }
    }
    for tx in &transactions {
        let sides = applied.remove(&tx.xid).unwrap_or_default();
        match tx.outcome.as_deref() {
            Some("committed") => {
                facts.transfers_committed += 1;
                if sides.len() != 2 {
                    problems.push(format!("transfer {} committed but applied at {sides:?} only", tx.xid));
                }
            }
            Some("aborted") => {
                facts.transfers_aborted += 1;
                if !sides.is_empty() {
                    problems.push(format!("transfer {} aborted but applied at {sides:?}", tx.xid));
                }
            }
            other => problems.push(format!("transfer {} has no outcome ({other:?})", tx.xid)),
        }
    }
    for xid in applied.keys() {
        problems.push(format!("transfer {xid} applied but unknown to the coordinator"));
    }
    Ok(verdict(
        "every 2PC transfer is applied on both sides or neither",
        &problems,
        format!(
            "{} committed on both sides, {} aborted on neither",
            facts.transfers_committed, facts.transfers_aborted
        ),
    ))
}

/// Concord's breaker journal: a `BreakerOpened {host, at, until}` each time a participant host's
/// breaker opens (README, "Flow control per participant host").
const BREAKER_JOURNAL: &str = "saga-@breakers";

/// The slack after a breaker opened: the journal records the moment the server's copy of the
/// host table holds the open breaker, and a call asks that copy just before its attempt's start
/// is taken, so the two are microseconds apart on the demo's one server.
const ADMITTED_BEFORE: chrono::TimeDelta = chrono::TimeDelta::milliseconds(100);

/// Flow control held: no attempt started at a host while its breaker was open (from the breaker
/// journal, against every attempt in the sagas' logs), and the inventory service never saw more
/// saga calls at once than its limit (its own count, from its log).
async fn flow_control(
    s: &Sources<'_>,
    details: &[concord_sdk::SagaOut],
    facts: &mut Facts,
) -> anyhow::Result<Invariant> {
    use chrono::{DateTime, Utc};
    let mut problems = Vec::new();
    // (host, at, until, version) and (host, at, version): the version is the host state's write
    // count, which orders the changes of one host whatever order their entries landed in.
    let mut openings: Vec<(String, DateTime<Utc>, DateTime<Utc>, u64)> = Vec::new();
    let mut closings: Vec<(String, DateTime<Utc>, u64)> = Vec::new();
    let mut from = 1;
    loop {
        let page = match s.admin.read_stream(BREAKER_JOURNAL, from, 1000).await {
            Ok(p) => p,
            // No breaker ever changed: the stream was never written.
            Err(e) if e.status() == Some(404) => break,
            Err(e) => return Err(e.into()),
        };
        let Some(last) = page.events.last() else { break };
        from = last.version + 1;
        for e in &page.events {
            let time = |k: &str| e.data[k].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
            let version = e.data["version"].as_u64();
            match (e.event_type.as_str(), e.data["host"].as_str(), time("at"), version) {
                ("BreakerOpened", Some(host), Some(at), Some(v)) => match time("until") {
                    Some(until) => openings.push((host.to_owned(), at, until, v)),
                    None => problems.push(format!("a breaker journal entry cannot be read: {}", e.data)),
                },
                ("BreakerClosed", Some(host), Some(at), Some(v)) => closings.push((host.to_owned(), at, v)),
                _ => problems.push(format!("a breaker journal entry cannot be read: {}", e.data)),
            }
        }
    }
    // Any success closes it (a probe's, or a call's let through before it opened): the host is
    // up, and calls go out from then on. An opening ends at the first closing after it (by the
    // host's version), if that comes before its probe time.
    for (h, _, until, v) in &mut openings {
        let next = closings
            .iter()
            .filter(|(host, _, cv)| host == h && *cv > *v)
            .min_by_key(|(_, _, cv)| *cv);
        if let Some((_, at, _)) = next
            && *at < *until
        {
            *until = *at;
        }
    }
    facts.breaker_openings = openings.len();
    if let Some(host) = &s.outage_host
        && !openings.iter().any(|(h, ..)| h == host)
    {
        problems.push(format!("{host} was down, but its breaker never opened"));
    }
    for g in details {
        for st in &g.steps {
            let Some(host) = s.step_hosts.get(&st.name) else {
                continue;
            };
            for a in &st.attempts {
                for (h, at, until, _) in &openings {
                    if h == host && a.started_at > *at + ADMITTED_BEFORE && a.started_at < *until {
                        problems.push(format!(
                            "saga {} {} {} attempt {} started at {} while {host}'s breaker was open ({at} until its probe or close at {until})",
                            g.id, st.name, a.op, a.attempt, a.started_at
                        ));
                    }
                }
            }
        }
    }
    // The participant's own count of calls in at once, from every log it wrote (restarts too).
    let peak = s
        .files
        .iter()
        .filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("inventory") && n.ends_with(".log"))
        })
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.contains(crate::common::SAGA_CALLS_PEAK))
                .filter_map(|l| {
                    let rest = &l[l.find("peak=")? + 5..];
                    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok()
                })
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0);
    facts.inventory_peak = peak;
    let inventory = s.step_hosts.get("reserve-north");
    let called = details.iter().any(|g| {
        g.steps
            .iter()
            .any(|st| s.step_hosts.get(&st.name) == inventory && !st.attempts.is_empty())
    });
    if called && peak == 0 {
        problems.push("the inventory service took saga calls but its log counts none (no peak line read)".into());
    }
    if peak > s.inventory_limit as usize {
        problems.push(format!(
            "the inventory service saw {peak} saga calls at once, over its limit of {}",
            s.inventory_limit
        ));
    }
    Ok(verdict(
        "flow control held (no attempt while a breaker was open, no participant over its limit)",
        &problems,
        format!(
            "the breaker opened {} times and no attempt started while it was open; the inventory service saw at most {peak} saga calls at once (limit {})",
            openings.len(),
            s.inventory_limit
        ),
    ))
}
