// Package api owns the vmshadow server's HTTP API under /api/v1: routing,
// authentication with API tokens and roles, JSON errors, Server-Sent
// Events of live runs, and the OpenAPI 3 document that describes it
// (served at /api/v1/openapi.json). The work behind each endpoint is the
// Service's, which package server implements.
package api
