//! Two-phase-commit transactions: begin, look up, list.

use crate::transport::{endpoint, json, segment};
use crate::{Client, ClientError};
use concord_api::ErrorCode;
use concord_api::tx::{BeginTxBody, TxDecision, TxOut, TxPage};
use reqwest::Method;

impl Client {
    pub async fn begin_transaction(&self, body: &BeginTxBody) -> Result<TxDecision, ClientError> {
        let url = endpoint(&self.base_url, &["v1", "transactions"])?;
        json(self.request(Method::POST, url).json(body)).await
    }

    /// `GET /v1/transactions/{xid}`: the outcome with each participant's vote and
    /// acknowledgement. An unknown xid answers `aborted` with `presumed: true`.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn transaction(&self, xid: &str) -> Result<TxOut, ClientError> {
        let xid = segment(xid, ErrorCode::InvalidParameter)?;
        let url = endpoint(&self.base_url, &["v1", "transactions", xid])?;
        json(self.request(Method::GET, url)).await
    }

    /// `GET /v1/transactions?outcome=&pending=&after=&limit=`: transactions by xid, without
    /// their participants. `outcome` is `committed`, `aborted` or `undecided`.
    ///
    /// # Errors
    ///
    /// `invalid_parameter` (400); see [`ClientError`].
    pub async fn list_transactions(
        &self,
        outcome: Option<&str>,
        pending: Option<bool>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<TxPage, ClientError> {
        let mut url = endpoint(&self.base_url, &["v1", "transactions"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(outcome) = outcome {
                query.append_pair("outcome", outcome);
            }
            if let Some(pending) = pending {
                query.append_pair("pending", if pending { "true" } else { "false" });
            }
            query.append_pair("limit", &limit.to_string());
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        json(self.request(Method::GET, url)).await
    }
}
