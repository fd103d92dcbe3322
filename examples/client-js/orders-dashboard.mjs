// A live orders dashboard from the `orders` table (corecast with --database-url).
//
//   node orders-dashboard.mjs              (CORECAST_URL, default http://127.0.0.1:4000; TOKEN)
//
// The table, for example:
//   CREATE TABLE orders (id text PRIMARY KEY, user_id text, total float8, status text);
//   ALTER TABLE orders REPLICA IDENTITY FULL;   -- so UPDATE and DELETE carry the old row
//   INSERT INTO orders VALUES ('o-1', 'u-1', 99.99, 'pending');
//   UPDATE orders SET status = 'shipped' WHERE id = 'o-1';

import { createClient } from '@corecast/client'
import WebSocket from 'ws'

const url = process.env.CORECAST_URL ?? 'http://127.0.0.1:4000'
const realtime = createClient(url, { token: process.env.TOKEN, WebSocket })

const orders = new Map()
let revenue = 0

function render(what) {
  console.clear()
  console.log(`orders: ${orders.size}   revenue: $${revenue.toFixed(2)}   (${what})`)
  for (const o of orders.values()) console.log(`  #${o.id}  ${String(o.status).padEnd(10)}  $${o.total}`)
}

const channel = realtime.channel('orders') // a table name: no slash
channel
  .on('INSERT', ({ data }) => {
    orders.set(data.id, data)
    revenue += Number(data.total) || 0
    render(`new order #${data.id}`)
  })
  .on('UPDATE', ({ data, old }) => {
    orders.set(data.id, data)
    render(`#${data.id}: ${old?.status ?? '?'} → ${data.status}`)
  })
  .on('DELETE', ({ data }) => {
    orders.delete(data.id)
    render(`#${data.id} deleted`)
  })
  .on('error', (e) => console.error(e.message))

await channel.subscribe()
render('waiting for changes')
