// Package api owns the vmshadow server's HTTP API under /api/v1: routing,
// authentication with API tokens and roles, JSON errors, Server-Sent
// Events of live runs, and the OpenAPI 3 document that describes it
// (served at /api/v1/openapi.json). The work behind each endpoint is the
// Service's, which package server implements.
//
// Every endpoint but /healthz needs a bearer token; each route names the
// least role it needs (viewer reads; operator also runs, cancels,
// enables and disables jobs, restores and serves; admin also edits jobs
// and deletes backups). The handler checks what it can itself (query
// parameters, path IDs, request bodies: at most MaxBodySize, no unknown
// fields) before calling the Service, and maps the Service's error
// classes to statuses (see classify). docs/api.md is the user's
// reference; package apitest holds responses to the OpenAPI document in
// tests.
package api
