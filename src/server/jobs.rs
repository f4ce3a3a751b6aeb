//! `dispatch.v1.Jobs`: wire types in, jobs desk call, wire types out.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::dispatcher::caller;
use super::status::to_status;
use crate::jobs::{JobError, Jobs, StoreError};
use crate::pb;
use crate::pb::jobs_server::Jobs as JobsApi;

pub struct JobsService {
    /// `None`: `[jobs] enabled = false`.
    jobs: Option<Arc<Jobs>>,
}

impl JobsService {
    pub fn new(jobs: Option<Arc<Jobs>>) -> Self {
        Self { jobs }
    }

    fn jobs(&self) -> Result<&Arc<Jobs>, Status> {
        self.jobs.as_ref().ok_or_else(|| job_status(&JobError::Disabled))
    }
}

/// Where the reasons of this service's `ErrorInfo` details are defined.
const ERROR_DOMAIN: &str = "dispatcher.jobs";

fn error_info(reason: &str, metadata: &[(&str, &str)]) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), crate::excerpt::truncate(v, 256).into_owned()))
        .collect();
    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
}

fn job_status(e: &JobError) -> Status {
    let message = crate::excerpt::truncate(&e.to_string(), 1024).into_owned();
    match e {
        JobError::Dispatch(d) => to_status(d),
        JobError::NotFound(_) => Status::not_found(message),
        JobError::BadId => Status::invalid_argument(message),
        JobError::TenantFull { .. }
        | JobError::Store(StoreError::Full(_))
        | JobError::Store(StoreError::DiskFull(_)) => Status::new(Code::ResourceExhausted, message),
        JobError::Store(StoreError::Fenced { .. }) => Status::aborted(message),
        JobError::Store(StoreError::Unavailable(_)) | JobError::Disabled | JobError::ShuttingDown => {
            Status::unavailable(message)
        }
        // Not UNAVAILABLE, which clients retry as it is: the work may be
        // stored, and a retry without the key would store it twice.
        JobError::Store(StoreError::Unknown(_)) => Status::deadline_exceeded(message),
        JobError::MaybeStored { job_id, key, .. } => Status::with_error_details(
            Code::DeadlineExceeded,
            message,
            error_info(
                "JOB_MAY_BE_STORED",
                &[("job_id", job_id), ("idempotency_key", key)],
            ),
        ),
        JobError::KeyReused { key, job_id } => Status::with_error_details(
            Code::AlreadyExists,
            message,
            error_info(
                "IDEMPOTENCY_KEY_REUSED",
                &[("job_id", job_id), ("idempotency_key", key)],
            ),
        ),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

/// Events buffered towards a slow watcher before the feed waits for it.
const WATCH_BUFFER: usize = 64;

#[tonic::async_trait]
impl JobsApi for JobsService {
    async fn submit_job(&self, request: Request<pb::SubmitJobRequest>) -> Result<Response<pb::Job>, Status> {
        let who = caller(&request);
        let job = self
            .jobs()?
            .submit(request.into_inner(), &who)
            .await
            .map_err(|e| job_status(&e))?;
        Ok(Response::new(job))
    }

    async fn get_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let who = caller(&request);
        let job = self
            .jobs()?
            .get(&request.get_ref().job_id, &who)
            .await
            .map_err(|e| job_status(&e))?;
        Ok(Response::new(job))
    }

    async fn cancel_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let who = caller(&request);
        let job = self
            .jobs()?
            .cancel(&request.get_ref().job_id, &who)
            .await
            .map_err(|e| job_status(&e))?;
        Ok(Response::new(job))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsReply>, Status> {
        let who = caller(&request);
        let jobs = self
            .jobs()?
            .list(request.into_inner(), &who)
            .await
            .map_err(|e| job_status(&e))?;
        Ok(Response::new(pb::ListJobsReply { jobs }))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = caller(&request);
        let jobs = self.jobs()?.clone();
        let r = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        // The first lookup's error (no such job, bad id) is the call's.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let found = jobs.get(&r.job_id, &who).await.map(|_| ());
            let ok = found.is_ok();
            let _ = first_tx.send(found);
            if !ok {
                return;
            }
            if let Err(e) = jobs.watch(r, &who, tx.clone()).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(job_status(&e)),
            Err(_) => return Err(Status::internal("the watch ended before it began")),
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = tokio_stream::StreamExt::map(stream, |r| r.map_err(|e| job_status(&e)));
        Ok(Response::new(Box::pin(stream)))
    }
}
