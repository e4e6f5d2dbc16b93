//! svcplane webhook (see README.md).
