//! Pod eligibility, readiness and target-port resolution shared by every controller and by `svcplane explain`.
