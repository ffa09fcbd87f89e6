// The api-docs Node.js example, unchanged but for base URL and key, against a running Dubhe.
// Prints one JSON line with what it saw; tests/gateway/test_node_sdk.py checks it.
import OpenAI from 'openai';

const client = new OpenAI({ baseURL: process.env.DUBHE_BASE_URL, apiKey: process.env.DUBHE_API_KEY, maxRetries: 0 });

const response = await client.chat.completions.create({
  model: 'dubhe-fast', messages: [{ role: 'user', content: 'Hello! [[sim:tokens=5]]' }] });

const stream = await client.chat.completions.create({
  model: 'dubhe-fast', messages: [{ role: 'user', content: 'Hello! [[sim:tokens=9]]' }], stream: true });
let streamed = '';
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  streamed += chunk.choices[0]?.delta?.content || '';
}

let errorStatus = null;
let errorCode = null;
try {
  await client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] });
} catch (err) {
  errorStatus = err.status;
  errorCode = err.code;
}

console.log(JSON.stringify({
  content: response.choices[0].message.content,
  usage: response.usage,
  model: response.model,
  streamed,
  chunks,
  errorStatus,
  errorCode,
}));
