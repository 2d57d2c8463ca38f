'use strict';
// ImageRouter's request stack, reduced to what reads a request body (tests/http/test_parity.py).
//
// As in ImageRouter's server (src/index.js, src/routes/{image,video}Routes.js,
// src/middleware/uploadMiddleware.js): Express 4 with app.use(express.json()), then per route
// multer 2.0.2 `upload.fields([...])` (busboy 1.6) and a MulterError handler. The handler reports
// the `model` it was given instead of generating; `cost: 0` lets the guard settle at once.
// It listens on 127.0.0.1 on a free port and prints {"port": N} as its first line.

const express = require('express');
const multer = require('multer');

const upload = multer({ storage: multer.memoryStorage(), limits: { fileSize: 25 * 1024 * 1024 } });
const imageFields = upload.fields([
  { name: 'image', maxCount: 16 },
  { name: 'image[]', maxCount: 16 },
  { name: 'mask', maxCount: 1 },
  { name: 'mask[]', maxCount: 1 },
]);
const videoFields = upload.fields([
  { name: 'image', maxCount: 6 },
  { name: 'image[]', maxCount: 6 },
]);

function handleMulterError(err, req, res, next) {
  if (err instanceof multer.MulterError) {
    return res.status(400).json({
      error: { message: `File upload error: ${err.message}`, type: 'invalid_request_error', code: err.code },
    });
  }
  return next(err);
}

function report(req, res) {
  // ImageRouter validates `model` with z.string(): only a string is ever run.
  const body = req.body;
  const model = body === undefined || body === null ? undefined : body.model;
  res.json({
    parity: true,
    body: body === undefined ? 'none' : Array.isArray(body) ? 'array' : typeof body,
    model: typeof model === 'string' ? model : null,
    model_type: Array.isArray(model) ? 'array' : model === null ? 'null' : typeof model,
    cost: 0,
  });
}

const app = express();
let posts = 0; // requests that reached this stand-in: a refused body must never arrive
const own = new Set(['/parity/posts', '/v1/credits', '/v2/models']);
app.use((req, res, next) => { if (!own.has(req.path)) posts += 1; next(); });
app.get('/parity/posts', (req, res) => res.json({ posts }));
app.use(express.json());
app.post('/v1/openai/images/generations', imageFields, handleMulterError, report);
app.post('/v1/openai/images/edits', imageFields, handleMulterError, report);
app.post('/v1/openai/videos/generations', videoFields, handleMulterError, report);
app.post('/v1/openai/chat/completions', report);

// What the guard's refresher reads at startup: a snapshot with room, and a price table.
app.get('/v1/credits', (req, res) => {
  res.json({ remaining_credits: '1000000.0000', credit_usage: '0.0000', total_deposits: '1000000.0000', usage_by_api_key: [] });
});
app.get('/v2/models', (req, res) => {
  res.json({
    'test/test': { id: 'test/test', price: { min: 0, average: 0, max: 0 }, aliases: [], output: ['image'] },
    'google/veo-3.1': { id: 'google/veo-3.1', price: { min: 3.2, average: 3.2, max: 3.2 }, aliases: [], output: ['video'] },
  });
});

// Errors from body-parser or busboy end here: the handler never ran.
app.use((err, req, res, next) => {
  res.status(err.status || err.statusCode || 500).json({
    error: { message: String(err.message), type: 'parser_error', code: err.code || err.type || null },
  });
});

const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});
process.stdin.on('end', () => process.exit(0)); // the test closes stdin to stop us
process.stdin.resume();
